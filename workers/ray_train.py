"""Run one train job with Ray Train (``TorchTrainer``, Train V2): DDP over ``spec.workers`` ranks.

The worker loop calls :func:`run_train_job`. Each Ray Train worker runs the shared training loop
(:func:`ensemble_core.training.train_ensemble`) with its real rank and world size; the global batch
is sliced per rank by the loader, and ``prepare_model`` wraps the :class:`TrainNet` in DDP (gloo on
CPUs, NCCL with one GPU per worker).

Run state, resume and failures:

- ``RunConfig(name=job_id, storage_path=...)``: a re-leased job resumes, because Train V2 reloads the
  run's checkpoint list from ``(storage_path, name)`` and ``ray.train.get_checkpoint()`` returns the
  latest one inside the workers. Every epoch each rank calls ``ray.train.report`` once; rank 0
  attaches a directory holding the one-file state of :mod:`ensemble_core.checkpoint`.
- ``FailureConfig(max_failures)``: when a Ray worker dies, Train restarts the group, which resumes
  from the last reported checkpoint.
- Cancel: the caller's ``should_stop`` is polled in the caller's process; a stop request is put in a
  :class:`~workers.ray_common.JobChannel` that rank 0 reads every few steps and broadcasts to the
  other ranks (so every rank stops after the same step). If the workers do not stop within a grace
  period (e.g. a very slow step), they are killed and the restarted group returns at once.
- Spec and data problems become :class:`workers.errors.UserError`: the spec is validated before
  anything starts, and a ``ValueError`` / ``DataUnavailableError`` raised while a worker sets the
  run up (before the first training step) is reported through the channel and ends the run at once.

A one-worker job runs instead on a warm actor kept between jobs (unless ``RE_WARM_TRAIN=0``)
(:mod:`workers.warm`), and a multi-worker job on a warm DDP group (unless ``RE_WARM_DDP=0``): one long-lived
``TorchTrainer`` run that serves job after job (:mod:`workers.warm_ddp`). Both keep the same contract; every
path resumes from the others' checkpoints.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from pydantic import ValidationError
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ensemble_core.spec import TrainSpec
from workers import startup
from workers.errors import InfrastructureError, JobCancelled, JobPreempted, UserError
from workers.ray_common import (
    DriveState,
    JobChannel,
    cpus_per_worker,
    describe_validation_error,
    drive,
    ensure_ray,
    torch_threads_for,
)

STATE_FILE = "state.pt"  # inside each Ray checkpoint directory: ensemble_core's one-file checkpoint
DEFAULT_MAX_FAILURES = 2  # worker-group restarts within one attempt before the attempt fails
STOP_GRACE_S = 20.0  # after a stop request, how long the workers may take before they are killed


def scaling_config_for(spec: TrainSpec, cpus: float | None = None) -> ScalingConfig:
    """One Ray Train worker per DDP rank; each reserves ``cpus`` cores and, with GPUs, exactly one GPU."""
    cpus = cpus_per_worker() if cpus is None else cpus
    resources: dict[str, float] = {"CPU": cpus}
    if spec.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker=resources)


try:  # Ray Train's own torch backend, timed for the start-up breakdown (workers/startup.py)
    from ray.train.torch.config import _TorchBackend
except ImportError:  # another Ray version: no process-group stamps (their seconds count in the next phase)
    _TorchBackend = None

if _TorchBackend is not None:
    class _TimedTorchBackend(_TorchBackend):  # type: ignore[misc, valid-type]
        """Ray's torch backend; once every rank's process group is up, each rank gets the set-up's stamps."""

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            start = time.time()
            super().on_start(worker_group, backend_config)
            worker_group.execute(startup.note_process_group, start=start, end=time.time())

    class TimedTorchConfig(TorchConfig):
        """``TorchConfig`` with :class:`_TimedTorchBackend`; everything else as Ray's."""

        @property
        def backend_cls(self) -> type:
            return _TimedTorchBackend


def torch_config_for(spec: TrainSpec) -> TorchConfig:
    """gloo on CPUs, NCCL with GPUs; the backend stamps the process group's set-up where it can."""
    cls = TimedTorchConfig if _TorchBackend is not None else TorchConfig
    return cls(backend="nccl" if spec.use_gpu else "gloo")


def validate_train_spec(spec: dict[str, Any] | TrainSpec) -> TrainSpec:
    """The validated spec, or :class:`UserError` naming the bad fields."""
    try:
        ts = spec if isinstance(spec, TrainSpec) else TrainSpec.model_validate(spec)
    except ValidationError as e:
        raise UserError(f"invalid train spec: {describe_validation_error(e)}") from e
    except ValueError as e:
        raise UserError(f"invalid train spec: {e}") from e
    if ts.batch_size % ts.workers:
        raise UserError(f"batch_size: the global batch {ts.batch_size} must be divisible by "
                        f"workers={ts.workers}")
    return ts


# ----------------------------------------------------------------------------------------------
# Inside each Ray Train worker


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Body of every Ray Train worker: resume, train with DDP, report per epoch, report the final state."""
    stamps = {"loop": time.time()}
    started = startup.process_started_at()  # Ray Train starts its workers per run: this run's process
    process = {"process": started} if started is not None else {}
    import torch
    import torch.distributed as dist

    from ensemble_core.checkpoint import load_checkpoint, save_checkpoint
    from ensemble_core.data import DataUnavailableError
    from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble

    stamps["imports"] = time.time()
    torch.set_num_threads(config["threads"])
    channel = config["channel"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    ray.get(channel.register_worker.remote(rank, ray.get_runtime_context().current_actor))
    # where each rank runs, in the job's log (the cluster test checks that a 2-worker run spans two nodes)
    channel.push.remote("log", f"rank {rank} of {world} on host {socket.gethostname()}, "
                               f"Ray node {ray.get_runtime_context().get_node_id()[:12]}")
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    def stop_requested() -> bool:
        """Rank 0 asks the channel; every rank gets the same answer (called at the same step on all ranks)."""
        flag = torch.zeros(1, device=device)
        if rank == 0 and ray.get(channel.stop_reason.remote()) is not None:
            flag += 1
        if distributed:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    if stop_requested():  # a restart after the caller asked to stop: end at once
        return {"stopped": True}

    def log(line: str) -> None:
        if rank == 0:
            channel.push.remote("log", line)
        else:
            print(f"[rank {rank}] {line}", flush=True)

    resume_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume_state = load_checkpoint(Path(d) / STATE_FILE)
    elif config.get("fallback_resume"):  # the job's earlier attempt ran on the warm path (workers/warm.py)
        resume_state = load_checkpoint(config["fallback_resume"])
        log(f"resuming from the warm path's state {Path(config['fallback_resume']).name}")

    phase = {"setup": True}

    def wrap(net: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        phase["setup"] = False  # called once the data, members and loader exist
        if world == 1:
            return net
        return ray.train.torch.prepare_model(
            net, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory(prefix="re-ckpt-") as d:
            checkpoint = None
            if state is not None:
                save_checkpoint(state, Path(d) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:  # after the report: an epoch the caller sees is an epoch that is checkpointed
            channel.push.remote("epoch", metrics)

    def on_phase(name: str) -> None:
        stamps[name] = time.time()
        if name == "first_step" and rank == 0:
            channel.push.remote("startup", {**stamps, **startup.process_group_stamps(), **process})

    hooks = TrainHooks(wrap=wrap, on_epoch_end=on_epoch_end, should_stop=stop_requested, log=log,
                       on_phase=on_phase)
    stamps["setup"] = time.time()
    try:
        result = train_ensemble(config["spec"], device=device, rank=rank, world_size=world,
                                resume_state=resume_state, hooks=hooks)
    except TrainingStopped:
        return {"stopped": True}
    except (ValidationError, DataUnavailableError, ValueError) as e:
        if not phase["setup"]:
            raise
        message = describe_validation_error(e) if isinstance(e, ValidationError) else str(e)
        ray.get(channel.push.remote("user_error", message))
        ray.get(channel.request_stop.remote("user_error"))
        return {"user_error": message}

    # The final state (rank 0) is reported as one more checkpoint, so the caller reads it from storage
    # and a re-run after this point only repeats the final evaluation.
    with tempfile.TemporaryDirectory(prefix="re-final-") as d:
        checkpoint = None
        final_metrics: dict[str, Any] = {"final": True}
        if rank == 0:
            assert result.state is not None
            save_checkpoint(result.state, Path(d) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(d)
            final_metrics.update(result.metrics)
        ray.train.report(final_metrics, checkpoint=checkpoint)
    return {"finished": True}


# ----------------------------------------------------------------------------------------------
# In the caller's process


def _event_handler(on_epoch: Callable[[dict[str, Any]], None], log: Callable[[str], None],
                   should_preempt: Callable[[], bool] | None,
                   preempt: dict[str, Any],
                   stamps: dict[str, float] | None = None) -> Callable[[str, Any, DriveState], None]:
    """The run's events on the caller's thread (both paths): epochs (then the preemption check), log lines,
    a user error, the training process's start-up stamps (the first run's, into ``stamps``);
    ``preempt["at"]`` records the epoch after which a preemption was asked for."""

    def handle(kind: str, payload: Any, state: DriveState) -> None:
        if kind == "epoch":
            on_epoch(payload)
            if preempt["at"] is None and should_preempt is not None and should_preempt():
                preempt["at"] = payload.get("global_epoch") or payload.get("epoch")
                state.stop_reason = state.stop_reason or "preempt"  # forwarded by drive() as the stop's reason
        elif kind == "log":
            log(payload)
        elif kind == "user_error":
            state.user_error = state.user_error or payload
        elif kind == "startup" and stamps is not None and "first_step" not in stamps:
            # the first start-up is kept (not a worker group's restart after a failure); a training process
            # older than the hand-over to Ray was not started for this run: its start is not a phase
            stamps.update({k: v for k, v in payload.items() if k != "process" or v >= stamps.get("fit", 0.0)})

    return handle


def _kill_workers(channel: Any) -> None:
    for handle in ray.get(channel.workers.remote(), timeout=10):
        ray.kill(handle, no_restart=True)


def _worker_failure_is_infrastructure(err: Exception) -> bool:
    failures = getattr(err, "worker_failures", None) or {}
    return any(isinstance(e, ray.exceptions.RayActorError) for e in failures.values())


def run_train_job(
    spec: dict[str, Any],
    *,
    job_id: str,
    storage_path: str,
    artifacts_dir: str,
    on_epoch: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    log: Callable[[str], None],
    max_failures: int = DEFAULT_MAX_FAILURES,
    should_preempt: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train the ensemble of ``spec`` with Ray Train; write ``ensemble.pt`` and ``results.json``.

    ``on_epoch(metrics)`` and ``log(line)`` are called on the caller's thread during the run (once per
    epoch trained in this call; an epoch redone after a worker restart is reported again).
    ``should_stop()`` is polled about once a second; when it turns true the run stops within seconds
    and :class:`JobCancelled` is raised. Calling again with the same ``job_id`` and ``storage_path``
    resumes from the last finished epoch. Returns ``{"metrics": ..., "results": ...}``.

    ``should_preempt()`` (priority preemption) is asked after each epoch the caller receives, which is an epoch
    already checkpointed: when true, the run stops (the workers stop a few steps into the next epoch) and
    :class:`JobPreempted` is raised; the next call resumes from that checkpoint. A run that finished meanwhile
    returns as usual.
    """
    from workers.warm import make_room, newest_state, warm_enabled

    stamps: dict[str, float] = {"call": time.time()}  # the start-up breakdown (workers/startup.py)
    ts = validate_train_spec(spec)
    if should_stop():
        raise JobCancelled("cancelled before the run started")
    ensure_ray()
    out_dir = Path(artifacts_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if ts.workers == 1 and warm_enabled():
        state_path = _run_warm(ts, job_id=job_id, storage_path=storage_path, on_epoch=on_epoch,
                               should_stop=should_stop, log=log, max_failures=max_failures,
                               should_preempt=should_preempt, stamps=stamps)
        return _finish(state_path, out_dir, log, t0, stamps)
    from workers.warm_ddp import warm_ddp_enabled

    if ts.workers > 1 and warm_ddp_enabled():
        state_path = _run_warm_group(ts, job_id=job_id, storage_path=storage_path, on_epoch=on_epoch,
                                     should_stop=should_stop, log=log, max_failures=max_failures,
                                     should_preempt=should_preempt, stamps=stamps)
        return _finish(state_path, out_dir, log, t0, stamps)
    cpus = cpus_per_worker()
    make_room(ts.workers * cpus, float(ts.workers) if ts.use_gpu else 0.0)  # idle warm actors and groups hold cores
    channel = JobChannel.remote()
    warm_state = newest_state(Path(storage_path) / str(job_id), warm_only=True)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"spec": ts.resolved(), "channel": channel, "threads": torch_threads_for(cpus),
                           "fallback_resume": str(warm_state) if warm_state is not None else None},
        scaling_config=scaling_config_for(ts, cpus),
        torch_config=torch_config_for(ts),
        run_config=RunConfig(
            name=str(job_id),
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )

    preempt: dict[str, Any] = {"at": None}
    handle = _event_handler(on_epoch, log, should_preempt, preempt, stamps)

    log(f"starting Ray Train: {ts.workers} worker(s), {'GPU' if ts.use_gpu else 'CPU'}, run {job_id}")
    stamps["fit"] = time.time()
    try:
        result, error, dstate = drive(
            trainer.fit, drain=lambda: ray.get(channel.drain.remote(), timeout=30), handle=handle,
            should_stop=lambda: preempt["at"] is not None or should_stop(),
            request_stop=lambda r: ray.get(channel.request_stop.remote(r), timeout=30),
            force_stop=lambda: _kill_workers(channel), log=log, grace_s=STOP_GRACE_S)
    finally:
        # Whatever happened, no worker of this run may outlive the call: a controller that lost contact
        # with this process must not go on training beside the next attempt. (Killing the channel also
        # makes any restarted worker fail at once.)
        try:
            _kill_workers(channel)
        except Exception as e:  # noqa: BLE001 - the channel itself may be gone
            log(f"could not clean up the run's workers: {type(e).__name__}: {e}")
        ray.kill(channel)

    if dstate.user_error is not None:
        raise UserError(dstate.user_error)
    if dstate.stop_reason == "cancel":
        raise JobCancelled(f"cancelled after {time.monotonic() - t0:.1f} s")
    finished = error is None and result is not None and result.checkpoint is not None and \
        bool((result.metrics or {}).get("final"))
    if dstate.stop_reason == "preempt" and not finished:
        raise JobPreempted(f"stopped after the checkpoint of epoch {preempt['at']}")
    if error is not None:
        if isinstance(error, ray.train.ControllerError | ray.exceptions.RayError) or \
                _worker_failure_is_infrastructure(error):
            # the controller or a worker process died, or Ray lost contact with it: retry the attempt
            raise InfrastructureError(f"Ray Train failed: {type(error).__name__}: {error}") from error
        raise error
    if result is None or result.checkpoint is None or not (result.metrics or {}).get("final"):
        # not a known infrastructure failure: transient, charged to max_attempts (so it cannot loop for long)
        raise RuntimeError("the Ray Train run ended without its final checkpoint")

    with result.checkpoint.as_directory() as d:
        return _finish(Path(d) / STATE_FILE, out_dir, log, t0, stamps)


def _finish(state_path: Path, out_dir: Path, log: Callable[[str], None], t0: float,
            stamps: dict[str, float] | None = None) -> dict[str, Any]:
    """Copy the final state to ``ensemble.pt``, write ``results.json``; the run's metrics and results.

    Where the run took its first step in this call, ``results.json`` also gets ``startup_s``: seconds per
    start-up phase (:func:`workers.startup.breakdown`)."""
    from ensemble_core.checkpoint import load_checkpoint

    tmp = out_dir / ".ensemble.pt.tmp"
    shutil.copyfile(state_path, tmp)
    tmp.replace(out_dir / "ensemble.pt")

    state = load_checkpoint(out_dir / "ensemble.pt")
    results = json.loads(state["results"])
    history = json.loads(state["history"])
    metrics = results.get("metrics", {})
    record = {"metrics": metrics, **results, "history": history}
    if stamps and "first_step" in stamps:
        try:
            parts = startup.breakdown(stamps)
        except ValueError as e:  # e.g. the hosts' clocks disagree: the breakdown is left out, not guessed
            log(f"no start-up breakdown: {e}")
        else:
            record["startup_s"] = parts
            results = {**results, "startup_s": parts}
            log(startup.describe(parts))
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))
    log(f"finished in {time.monotonic() - t0:.1f} s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "member" not in k))
    return {"metrics": metrics, "results": {**results, "history": history}}


def _run_warm(ts: TrainSpec, *, job_id: str, storage_path: str, on_epoch: Callable[[dict[str, Any]], None],
              should_stop: Callable[[], bool], log: Callable[[str], None], max_failures: int,
              should_preempt: Callable[[], bool] | None, stamps: dict[str, float] | None = None) -> Path:
    """Run a one-worker job on a warm actor (workers/warm.py); the path of its final state.

    Raises what the cold path raises: :class:`JobCancelled`, :class:`JobPreempted`, :class:`UserError`, and
    :class:`InfrastructureError` when the actor died more than ``max_failures`` times in this attempt.
    """
    import uuid

    from workers.warm import POOL, _kill
    from workers.warm_ddp import GROUPS

    closed = GROUPS.release_idle()  # an idle warm DDP group holds the cores this actor may need
    cpus = cpus_per_worker()
    run_dir = str(Path(storage_path) / str(job_id))
    failures = 0
    preempt: dict[str, Any] = {"at": None}
    handle = _event_handler(on_epoch, log, should_preempt, preempt, stamps)

    while True:
        t_acquire = time.monotonic()
        actor, reused = POOL.acquire(cpus, ts.use_gpu, settle_s=2.0 if closed else 0.0)
        key = f"{job_id}-{uuid.uuid4().hex[:8]}"
        log(f"starting on a warm trainer ({'reused' if reused else 'new'}, "
            f"{time.monotonic() - t_acquire:.2f} s to acquire), run {job_id}")
        if stamps is not None:
            stamps.setdefault("fit", time.time())
        result, error, dstate = drive(
            lambda a=actor, k=key: ray.get(a.run.remote(ts.resolved(), k, run_dir, torch_threads_for(cpus))),
            drain=lambda a=actor, k=key: ray.get(a.drain.remote(k), timeout=30), handle=handle,
            should_stop=lambda: preempt["at"] is not None or should_stop(),
            request_stop=lambda r, a=actor, k=key: ray.get(a.request_stop.remote(k, r), timeout=30),
            force_stop=lambda a=actor: _kill(a), log=log, grace_s=STOP_GRACE_S)
        if error is None and not dstate.forced and result is not None:
            POOL.release(actor, cpus, ts.use_gpu)
        else:
            _kill(actor)
        if result is not None and result.get("user_error"):
            raise UserError(result["user_error"])
        if dstate.stop_reason == "cancel":
            raise JobCancelled("cancelled on the warm trainer")
        finished = result is not None and bool(result.get("finished"))
        if dstate.stop_reason == "preempt" and not finished:
            raise JobPreempted(f"stopped after the checkpoint of epoch {preempt['at']}")
        if isinstance(error, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
            failures += 1
            if failures > max_failures:
                raise InfrastructureError(f"the warm trainer died {failures} times: {error}") from error
            log(f"the warm trainer died ({type(error).__name__}); resuming from the last checkpoint on a new one "
                f"({failures} of {max_failures} restarts)")
            continue
        if isinstance(error, ray.exceptions.RayTaskError):
            raise RuntimeError(f"training failed on the warm trainer: {error.cause!r}") from error
        if error is not None:
            raise error
        if not finished:
            raise RuntimeError(f"the warm run ended without its final state: {result}")
        return Path(result["state_path"])


def _run_warm_group(ts: TrainSpec, *, job_id: str, storage_path: str, on_epoch: Callable[[dict[str, Any]], None],
                    should_stop: Callable[[], bool], log: Callable[[str], None], max_failures: int,
                    should_preempt: Callable[[], bool] | None, stamps: dict[str, float] | None = None) -> Path:
    """Run a multi-worker job on a warm DDP group (workers/warm_ddp.py); the path of its final state.

    Raises what the cold path raises: :class:`JobCancelled`, :class:`JobPreempted`, :class:`UserError`, and
    :class:`InfrastructureError` when the group's run ended under the job (its worker restarts spent, or a Ray
    failure).
    """
    import uuid

    from workers.warm import idle_seconds
    from workers.warm_ddp import GROUPS, GroupDied

    cpus = cpus_per_worker()
    t_acquire = time.monotonic()
    group, reused = GROUPS.acquire(ts, cpus, torch_threads_for(cpus), storage_path, max_failures=max_failures,
                                   scaling_config=scaling_config_for(ts, cpus), torch_config=torch_config_for(ts))
    try:
        log(f"starting on a warm DDP group of {ts.workers} workers ({'reused' if reused else 'new'}, "
            f"{time.monotonic() - t_acquire:.2f} s to acquire), run {job_id}")
        key = f"{job_id}-{uuid.uuid4().hex[:8]}"
        job = {"key": key, "spec": ts.resolved(), "run_dir": str(Path(storage_path) / str(job_id)),
               "threads": torch_threads_for(cpus)}
        preempt: dict[str, Any] = {"at": None}
        handle = _event_handler(on_epoch, log, should_preempt, preempt, stamps)
        if stamps is not None:
            stamps.setdefault("fit", time.time())
        result, error, dstate = drive(
            lambda: group.run(job), drain=lambda: ray.get(group.dispatcher.drain.remote(key), timeout=30),
            handle=handle, should_stop=lambda: preempt["at"] is not None or should_stop(),
            request_stop=lambda r: ray.get(group.dispatcher.request_stop.remote(key, r), timeout=30),
            force_stop=lambda: GROUPS.discard(group), log=log, grace_s=STOP_GRACE_S)
    finally:
        GROUPS.done(group)  # from here on it may be closed as idle
    if error is not None or dstate.forced:
        GROUPS.discard(group)
    elif idle_seconds() == 0:
        GROUPS.release_idle()  # no idle group kept (as no idle warm actor is)
    if result is not None and result.get("user_error"):
        raise UserError(result["user_error"])
    if dstate.stop_reason == "cancel":
        raise JobCancelled("cancelled on the warm DDP group")
    finished = result is not None and bool(result.get("finished"))
    if dstate.stop_reason == "preempt" and not finished:
        raise JobPreempted(f"stopped after the checkpoint of epoch {preempt['at']}")
    if isinstance(error, GroupDied):
        cause = group.error
        if cause is None or isinstance(cause, ray.train.ControllerError | ray.exceptions.RayError) or \
                _worker_failure_is_infrastructure(cause):
            raise InfrastructureError(f"the warm DDP group failed: {error}") from error
        raise RuntimeError(f"training failed on the warm DDP group: {cause!r}") from error
    if error is not None:
        raise error
    if not finished:
        raise RuntimeError(f"the warm group's run of the job ended without its final state: {result}")
    return Path(result["state_path"])


__all__ = ["STATE_FILE", "run_train_job", "scaling_config_for", "torch_config_for", "validate_train_spec"]
