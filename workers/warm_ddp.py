"""Warm multi-worker DDP (issue "Warm start"): one long-lived Ray Train run serves DDP train jobs in turn.

A DDP job on the cold path pays for a whole Ray Train run before its first step: Ray Train 2.60 starts 8 new
processes per run (its controller, helpers and the workers, which then import torch and set up the process
group; ``python -m bench ddp-pool``, docs/benchmarks.md). Here Ray Train's ``TorchTrainer`` is kept, and its
run is kept too: the training function of a :class:`WarmGroup` takes job after job from a
:class:`GroupDispatcher` actor and runs each with :func:`ensemble_core.training.train_ensemble` in the process
group that Ray Train set up once. Torch, the models' code and the decoded data sets stay loaded.

The warm path's contract (workers/warm.py, docs/reliability.md) holds on this path too:

- **Checkpoint and resume.** Rank 0 writes each epoch's state atomically under ``<storage>/<job id>/warm/``
  before the epoch is reported; a job resumes from the newest state of either path (:func:`newest_state`), and
  the cold path resumes from these states.
- **Cancel within seconds.** The caller's stop request goes to the dispatcher; rank 0 reads it between steps
  and every rank gets the answer by a broadcast, so all ranks stop at the same step. A group that does not stop
  within the grace period is killed.
- **Failures.** When a worker process dies, Ray Train's ``FailureConfig`` restarts the group, and the
  dispatcher hands the unfinished job out again: it resumes from its last state. A group whose run has ended
  (restarts spent, killed) fails the job's attempt as an infrastructure failure and is replaced. The group is
  owned by the job worker's process and dies with it.
- **Resources.** A group reserves its workers' cores (and GPUs) while it lives. An idle group ends its run
  after ``RE_WARM_IDLE_SECONDS`` (default 120) and is closed before this process starts any other run that
  needs Ray's resources (:func:`release_idle`), or within seconds when another job-worker process's run needs
  more than Ray has free (the demand board of workers/warm.py: :func:`workers.warm.ask_for_room`).

The default for train jobs with ``workers`` > 1 since 2026-12-07, after its contract tests and a full-size kill
soak with DDP jobs (docs/reliability.md, section *Soak*); ``RE_WARM_DDP=0`` (or false/no/off) sends them to the
cold path (``TorchTrainer.fit()`` per job).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from workers.warm import (
    _OFF,
    _ON,
    KEEP_STATES,
    WARM_DIR,
    _write_state,
    idle_seconds,
    make_room,
    newest_state,
    register_holder,
    register_idle_release,
    watch_demand,
)

GROUP_ENV = "RE_WARM_DDP"


def warm_ddp_enabled() -> bool:
    """Whether multi-worker train jobs run on a warm group: yes unless ``RE_WARM_DDP`` is 0/false/no/off (unset or
    empty means on); any other value is an error naming the variable."""
    raw = os.environ.get(GROUP_ENV, "").strip().lower()
    if raw in _OFF:
        return False
    if raw in _ON or raw == "":
        return True
    raise ValueError(f"{GROUP_ENV} must be one of {', '.join(_ON + _OFF)}, got {os.environ[GROUP_ENV]!r}")


class Dispatcher:
    """The jobs of one warm group, one at a time: handed to rank 0, their events and results back to the caller,
    the caller's stop requests to the ranks. A job handed out but not finished is handed out again (after Ray
    Train restarted the group)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._results: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[tuple[str, Any]]] = {}
        self._stop: dict[str, str] = {}
        self._workers: dict[int, Any] = {}
        self._closed = False
        self.jobs = 0

    def submit(self, job: dict[str, Any]) -> bool:
        """Queue a job; False when the group has closed (idle timeout, shut down): use another group."""
        with self._cond:
            if self._closed:
                return False
            self._queue.append(job)
            self._cond.notify_all()
            return True

    def next_job(self, timeout_s: float) -> dict[str, Any] | None:
        """Rank 0 asks for work: the unfinished job (after a restart) or the next queued one; None after
        ``timeout_s`` idle seconds or once closed (the group then ends its run)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._current is not None:
                    return self._current
                if self._closed:
                    return None
                if self._queue:
                    self.jobs += 1
                    self._current = {**self._queue.pop(0), "job_number": self.jobs}
                    return self._current
                left = deadline - time.monotonic()
                if left <= 0:
                    self._closed = True
                    return None
                self._cond.wait(left)

    def finish(self, key: str, result: dict[str, Any]) -> None:
        with self._cond:
            self._results[key] = result
            if self._current is not None and self._current["key"] == key:
                self._current = None
            self._stop.pop(key, None)
            self._cond.notify_all()

    def wait(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's result, waiting up to ``timeout_s``; None meanwhile."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._results:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._results.pop(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def is_idle(self) -> bool:
        with self._cond:
            return self._current is None and not self._queue

    # events out, stop requests in, and the workers (to kill them), as the cold path's JobChannel
    def push(self, key: str, kind: str, payload: Any) -> None:
        with self._cond:
            self._events.setdefault(key, []).append((kind, payload))

    def drain(self, key: str) -> list[tuple[str, Any]]:
        with self._cond:
            events, self._events[key] = self._events.get(key, []), []
        return events

    def request_stop(self, key: str, reason: str) -> None:
        with self._cond:
            self._stop.setdefault(key, reason)

    def stop_reason(self, key: str) -> str | None:
        with self._cond:
            return self._stop.get(key)

    def register_worker(self, rank: int, handle: Any) -> None:
        with self._cond:
            self._workers[rank] = handle

    def workers(self) -> list[Any]:
        with self._cond:
            return list(self._workers.values())


GroupDispatcher = ray.remote(num_cpus=0, max_concurrency=16)(Dispatcher)  # the actor: calls on 16 threads


def _group_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker of a warm group: take job after job until the dispatcher says none."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(config["threads"])
    dispatcher = config["dispatcher"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # broadcast_object_list under NCCL stages the job on the current device
    ray.get(dispatcher.register_worker.remote(rank, ray.get_runtime_context().current_actor))
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    while True:
        box = [ray.get(dispatcher.next_job.remote(config["idle_s"])) if rank == 0 else None]
        if distributed:
            dist.broadcast_object_list(box, src=0)
        job = box[0]
        if job is None:
            return
        _run_job(job, dispatcher, rank, world, device, distributed)


def _run_job(job: dict[str, Any], dispatcher: Any, rank: int, world: int, device: Any, distributed: bool) -> None:
    """One job on this rank of the group, as the warm actor runs one (workers/warm.py): resume, train, report."""
    stamps = {"loop": time.time()}
    import torch
    import torch.distributed as dist
    from pydantic import ValidationError

    from ensemble_core.checkpoint import load_checkpoint
    from ensemble_core.data import DataUnavailableError
    from ensemble_core.spec import TrainSpec
    from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble
    from workers.ray_common import describe_validation_error

    stamps["imports"] = time.time()
    key, run_dir = job["key"], Path(job["run_dir"])
    warm_dir = run_dir / WARM_DIR
    torch.set_num_threads(job["threads"])
    ts = TrainSpec.model_validate(job["spec"])
    torch.use_deterministic_algorithms(bool(ts.deterministic))

    def log(line: str) -> None:
        if rank == 0:
            dispatcher.push.remote(key, "log", line)

    def stop_requested() -> bool:
        """Rank 0 asks the dispatcher; every rank gets the same answer (called at the same step on all ranks)."""
        flag = torch.zeros(1, device=device)
        if rank == 0 and ray.get(dispatcher.stop_reason.remote(key)) is not None:
            flag += 1
        if distributed:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    source = newest_state(run_dir)
    resume_state = load_checkpoint(source) if source is not None else None
    # every rank names its host (as the cold path's ranks do): where the ranks ran is what a multi-node check reads
    dispatcher.push.remote(
        key, "log", f"warm group rank {rank} of {world} on host {socket.gethostname()}, pid {os.getpid()}: job "
        f"{job['job_number']} of this group"
        + (f", resuming from {source.parent.name}/{source.name}" if source is not None and rank == 0 else ""))
    phase = {"setup": True}

    def wrap(net: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        phase["setup"] = False
        return ray.train.torch.prepare_model(
            net, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if rank != 0:
            return
        if state is not None:
            epoch = int(metrics.get("global_epoch") or metrics.get("epoch") or 0)
            _write_state(state, warm_dir / f"epoch-{epoch:05d}.pt")
            for old in sorted(warm_dir.glob("epoch-*.pt"))[:-KEEP_STATES]:
                old.unlink(missing_ok=True)
        # after the write: an epoch the caller sees is on disk; waited for, so that it reaches the dispatcher
        # before the job's result does (a threaded actor does not keep the order of calls)
        ray.get(dispatcher.push.remote(key, "epoch", metrics))

    def on_phase(name: str) -> None:
        stamps[name] = time.time()
        if name == "first_step" and rank == 0:
            ray.get(dispatcher.push.remote(key, "startup", dict(stamps)))

    hooks = TrainHooks(wrap=wrap, on_epoch_end=on_epoch_end, should_stop=stop_requested, log=log,
                       on_phase=on_phase)
    result: dict[str, Any]
    try:
        if stop_requested():
            result = {"stopped": True}
        else:
            stamps["setup"] = time.time()
            out = train_ensemble(ts, device=device, rank=rank, world_size=world, resume_state=resume_state,
                                 hooks=hooks)
            if rank == 0:
                assert out.state is not None
                final = warm_dir / "final.pt"
                _write_state(out.state, final)
                result = {"finished": True, "state_path": str(final)}
            else:
                result = {}
    except TrainingStopped:
        result = {"stopped": True}
    except (ValidationError, DataUnavailableError, ValueError) as e:
        if not phase["setup"]:
            raise
        result = {"user_error": describe_validation_error(e) if isinstance(e, ValidationError) else str(e)}
    if distributed:
        dist.barrier()  # every rank is done with this job before the next is taken
    if rank == 0:
        ray.get(dispatcher.finish.remote(key, result))


class GroupDied(RuntimeError):
    """The group's Ray Train run ended while a job was on it (its restarts spent, or killed)."""


class WarmGroup:
    """One long-lived ``TorchTrainer`` run of ``workers`` ranks and its dispatcher, driven from a thread of the
    job worker's process."""

    def __init__(self, spec: Any, cpus: float, threads: int, storage_path: str, max_failures: int,
                 scaling_config: Any, torch_config: Any) -> None:
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        self.shape = group_shape(spec, cpus)
        self.dispatcher = GroupDispatcher.remote()
        self.name = f"warm-group-{uuid.uuid4().hex[:10]}"
        self.trainer = TorchTrainer(
            _group_loop,
            # at least 10 s: the job reaches the dispatcher while Ray Train starts the ranks (RE_WARM_IDLE_SECONDS=0
            # closes the group after each job instead: workers/ray_train.py)
            # and at most 25 min: the other ranks wait for the next job in a collective, whose timeout is 30 min
            train_loop_config={"dispatcher": self.dispatcher, "threads": threads,
                               "idle_s": min(max(idle_seconds(), 10.0), 1500.0)},
            scaling_config=scaling_config, torch_config=torch_config,
            run_config=RunConfig(name=self.name, storage_path=str(Path(storage_path) / "warm-groups"),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._fit, name=self.name, daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - kept for the job on the group, if any
            self.error = e
        finally:
            self.done.set()

    def alive(self) -> bool:
        return not self.done.is_set()

    def run(self, job: dict[str, Any], poll_s: float = 0.5) -> dict[str, Any]:
        """Submit ``job`` and wait for its result; :class:`GroupDied` when the run ended meanwhile."""
        if not ray.get(self.dispatcher.submit.remote(job), timeout=30):
            raise GroupDied("the group had closed (idle) before the job reached it")
        while True:
            result = ray.get(self.dispatcher.wait.remote(job["key"], poll_s), timeout=30 + poll_s)
            if result is not None:
                return result
            if self.done.is_set():
                raise GroupDied(f"the warm group's Ray Train run ended: {self.error!r}")

    def kill(self) -> None:
        """Kill the workers and the dispatcher; the run then ends (its thread is not waited for)."""
        with contextlib.suppress(Exception):
            for handle in ray.get(self.dispatcher.workers.remote(), timeout=10):
                ray.kill(handle, no_restart=True)
        with contextlib.suppress(Exception):
            ray.get(self.dispatcher.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(self.dispatcher, no_restart=True)

    def close(self, wait_s: float = 30.0) -> None:
        """End the run when idle: the ranks leave their loop; killed if they have not within ``wait_s``."""
        with contextlib.suppress(Exception):
            ray.get(self.dispatcher.close.remote(), timeout=10)
        if not self.done.wait(wait_s):
            self.kill()
        with contextlib.suppress(Exception):
            ray.kill(self.dispatcher, no_restart=True)


def group_shape(spec: Any, cpus: float) -> tuple[int, float, bool]:
    return (int(spec.workers), float(cpus), bool(spec.use_gpu))


class GroupPool:
    """This process's warm groups, one per shape (workers, cores per worker, GPU); one job per group at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[tuple[int, float, bool], WarmGroup] = {}
        self._held: dict[int, int] = {}  # id(group) -> jobs between acquire() and done(): never closed as idle

    def acquire(self, spec: Any, cpus: float, threads: int, storage_path: str, *, max_failures: int,
                scaling_config: Any, torch_config: Any) -> tuple[WarmGroup, bool]:
        """The live group of this shape, else a new one (other idle groups are closed first: their cores). The
        caller holds it until :meth:`done`: until then :meth:`release_idle` leaves it alone, even before its job
        has reached the dispatcher."""
        shape = group_shape(spec, cpus)
        with self._lock:
            group = self._groups.get(shape)
            if group is not None and group.alive():
                self._held[id(group)] = self._held.get(id(group), 0) + 1
                return group, True
            self._groups.pop(shape, None)
        # this process's idle groups and one-worker actors, then other job workers' where Ray has too little free
        make_room(spec.workers * cpus, float(spec.workers) if spec.use_gpu else 0.0)
        group = WarmGroup(spec, cpus, threads, storage_path, max_failures, scaling_config, torch_config)
        with self._lock:
            self._groups[shape] = group
            self._held[id(group)] = self._held.get(id(group), 0) + 1
        watch_demand()
        return group, False

    def done(self, group: WarmGroup) -> None:
        """The caller's job is over (finished, stopped or failed): the group may be closed as idle again."""
        with self._lock:
            n = self._held.get(id(group), 0) - 1
            if n > 0:
                self._held[id(group)] = n
            else:
                self._held.pop(id(group), None)

    def discard(self, group: WarmGroup) -> None:
        """Kill a group that failed or did not stop in time, and forget it."""
        group.kill()
        with self._lock:
            if self._groups.get(group.shape) is group:
                del self._groups[group.shape]

    def release_idle(self, except_shape: tuple[int, float, bool] | None = None) -> int:
        """Close every group without a job (their cores are needed elsewhere); returns how many."""
        with self._lock:
            groups = [(s, g) for s, g in self._groups.items() if s != except_shape and id(g) not in self._held]
        closed = 0
        for shape, g in groups:
            idle = not g.alive()
            if not idle:
                with contextlib.suppress(Exception):
                    idle = bool(ray.get(g.dispatcher.is_idle.remote(), timeout=10))
            if idle:
                g.close()
                with self._lock:
                    if self._groups.get(shape) is g:
                        del self._groups[shape]
                closed += 1
        return closed

    def live_count(self) -> int:
        with self._lock:
            return sum(g.alive() for g in self._groups.values())


GROUPS = GroupPool()
register_idle_release(GROUPS.release_idle)  # workers.warm.release_idle() closes idle groups too
register_holder(GROUPS.live_count)  # the demand watcher runs while this process keeps a group


def release_idle() -> int:
    """Close this process's idle warm groups before a run that needs Ray's resources."""
    return GROUPS.release_idle()


__all__ = ["GROUPS", "Dispatcher", "GroupDied", "GroupDispatcher", "GroupPool", "WarmGroup", "release_idle",
           "warm_ddp_enabled"]
