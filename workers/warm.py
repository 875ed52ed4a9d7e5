"""Warm single-worker training (issue "Warm start"): one long-lived Ray actor per job-worker process.

A one-worker train job on the cold path pays, before its first step, for Ray Train's controller, a new
worker-group process, ``import torch`` and ``ray.train.torch`` in it, and the data set's decoding, every
time (docs/benchmarks.md, "Service overhead"). Here a :class:`WarmTrainer` actor, created once per
job-worker process and kept while jobs keep coming, runs the same training loop
(:func:`ensemble_core.training.train_ensemble`) for job after job: torch, the models' code and the decoded
data sets (``ensemble_core.data`` caches them per process) stay loaded.

The contract of the cold path (docs/reliability.md) holds on this path too:

- **Checkpoint and resume.** Every epoch the actor writes the one-file state of :mod:`ensemble_core.checkpoint`
  atomically under ``<storage>/<job id>/warm/`` *before* the epoch is reported, so an epoch the caller sees
  is an epoch on disk. A re-run of the job (a new attempt, on any worker) resumes from the newest state of
  that folder or, where the job began on the cold path, from Ray Train's newest checkpoint of the run
  (``checkpoint_*/state.pt``), whichever was written last; the cold path falls back to the warm states the
  same way (:func:`newest_state`).
- **Cancel within seconds.** The caller's stop request is a call on the actor (it serves a few calls at once);
  the loop reads it between steps. An actor that does not stop within the grace period is killed.
- **Failures.** An actor that dies mid-run (OOM, a killed process) is replaced and the run resumes from its
  last state, up to ``max_failures`` times within the attempt, as Ray Train's ``FailureConfig`` does; then
  the attempt fails as an infrastructure failure and the job is re-leased. The actor is owned by the job
  worker's process, so it dies with it: a worker whose lease was taken over cannot go on training beside
  the next attempt.
- **Resources.** The actor reserves the cores (and the GPU) of one Ray Train worker for as long as it lives.
  An idle actor is killed after ``RE_WARM_IDLE_SECONDS`` (default 120) and before this process starts any
  run that needs Ray's resources otherwise (a DDP job, a Tune search, a sharded evaluation:
  :func:`release_idle`). When a run of *another* job-worker process needs more than Ray has free, that
  process opens a request for room on the cluster's demand board (:func:`ask_for_room`), and every process
  holding warm resources frees its idle ones within :data:`WATCH_S` seconds while the request is open.

Multi-worker DDP jobs keep Ray Train's ``TorchTrainer`` (workers/ray_train.py). The warm path is on by default
for one-worker train jobs; ``RE_WARM_TRAIN=0`` (or false/no/off) sends them to Ray Train's ``TorchTrainer`` as
well. It became the default after a full-size kill soak on it (docs/reliability.md, section *Soak*).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

WARM_ENV = "RE_WARM_TRAIN"
IDLE_ENV = "RE_WARM_IDLE_SECONDS"
DEFAULT_IDLE_S = 120.0
WARM_DIR = "warm"  # under <storage>/<job id>/
KEEP_STATES = 2


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def warm_enabled() -> bool:
    """Whether one-worker train jobs run on a warm actor: yes unless ``RE_WARM_TRAIN`` is 0/false/no/off (unset
    or empty means on); any other value is an error naming the variable."""
    raw = os.environ.get(WARM_ENV, "").strip().lower()
    if raw in _OFF:
        return False
    if raw in _ON or raw == "":
        return True
    raise ValueError(f"{WARM_ENV} must be one of {', '.join(_ON + _OFF)}, got {os.environ[WARM_ENV]!r}")


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_IDLE_S
    except ValueError as e:
        raise ValueError(f"{IDLE_ENV} must be a number of seconds, got {raw!r}") from e
    if value < 0:
        raise ValueError(f"{IDLE_ENV} must not be negative, got {raw!r}")
    return value


def newest_state(run_dir: str | Path, *, warm_only: bool = False) -> Path | None:
    """The state file written last in a run's folder: the warm path's epoch states or (unless ``warm_only``)
    Ray Train's checkpoints; None when there is none."""
    run_dir = Path(run_dir)
    found = list((run_dir / WARM_DIR).glob("epoch-*.pt"))
    if not warm_only:
        found += run_dir.glob("checkpoint_*/state.pt")
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _write_state(state: dict[str, Any], path: Path) -> None:
    from ensemble_core.checkpoint import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_checkpoint(state, tmp)
    tmp.replace(path)


@ray.remote(max_concurrency=4)  # run() on one thread; stop requests, event drains and pings on the others
class WarmTrainer:
    """A process that keeps torch, the training code and the decoded data sets loaded between jobs."""

    def __init__(self) -> None:
        import torch  # noqa: F401 - the point of the actor: imported once

        import ensemble_core.training  # noqa: F401

        self._lock = threading.Lock()
        self._events: dict[str, list[tuple[str, Any]]] = {}
        self._stop: dict[str, str] = {}
        self.jobs = 0
        self.started = time.time()

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "jobs": self.jobs, "host": socket.gethostname()}

    # -- the caller's side of a run: events out, a stop request in
    def push(self, run: str, kind: str, payload: Any) -> None:
        with self._lock:
            self._events.setdefault(run, []).append((kind, payload))

    def drain(self, run: str) -> list[tuple[str, Any]]:
        with self._lock:
            events, self._events[run] = self._events.get(run, []), []
        return events

    def request_stop(self, run: str, reason: str) -> None:
        with self._lock:
            self._stop.setdefault(run, reason)

    def run(self, spec: dict[str, Any], run: str, run_dir: str, threads: int) -> dict[str, Any]:
        """Train ``spec`` (resolved) for run ``run``, resuming from the newest state in ``run_dir``.

        Returns ``{"finished": True, "state_path": ...}``, ``{"stopped": True}`` or ``{"user_error": ...}``.
        The run's start-up stamps (workers/startup.py) go to the caller as a ``startup`` event after its first
        step.
        """
        stamps = {"loop": time.time()}
        import torch
        from pydantic import ValidationError

        from ensemble_core.checkpoint import load_checkpoint
        from ensemble_core.data import DataUnavailableError
        from ensemble_core.spec import TrainSpec
        from ensemble_core.training import TrainHooks, TrainingStopped, pick_device, train_ensemble
        from workers.ray_common import describe_validation_error

        stamps["imports"] = time.time()
        t0 = time.perf_counter()
        self.jobs += 1
        # process-wide torch settings an earlier job may have changed
        torch.set_num_threads(threads)
        ts = TrainSpec.model_validate(spec)
        torch.use_deterministic_algorithms(bool(ts.deterministic))
        warm_dir = Path(run_dir) / WARM_DIR

        def log(line: str) -> None:
            self.push(run, "log", line)

        def stop_requested() -> bool:
            return run in self._stop

        source = newest_state(run_dir)
        resume_state = load_checkpoint(source) if source is not None else None
        log(f"warm trainer on host {socket.gethostname()}, Ray node {ray.get_runtime_context().get_node_id()[:12]}, "
            f"pid {os.getpid()}: job {self.jobs} of this process"
            + (f", resuming from {source.parent.name}/{source.name}" if source is not None else ""))
        phase = {"setup": True}

        def wrap(net: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
            phase["setup"] = False  # the data, members and loader exist
            log(f"set up in {time.perf_counter() - t0:.2f} s (warm process); first step next")
            return net

        def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
            if state is not None:
                epoch = int(metrics.get("global_epoch") or metrics.get("epoch") or 0)
                _write_state(state, warm_dir / f"epoch-{epoch:05d}.pt")
                for old in sorted(warm_dir.glob("epoch-*.pt"))[:-KEEP_STATES]:
                    old.unlink(missing_ok=True)
            self.push(run, "epoch", metrics)  # after the write: an epoch the caller sees is on disk

        def on_phase(name: str) -> None:
            stamps[name] = time.time()
            if name == "first_step":
                self.push(run, "startup", dict(stamps))

        hooks = TrainHooks(wrap=wrap, on_epoch_end=on_epoch_end, should_stop=stop_requested, log=log,
                           on_phase=on_phase)
        try:
            if stop_requested():
                return {"stopped": True}
            stamps["setup"] = time.time()
            result = train_ensemble(ts, device=pick_device(ts.use_gpu), rank=0, world_size=1,
                                    resume_state=resume_state, hooks=hooks)
        except TrainingStopped:
            return {"stopped": True}
        except (ValidationError, DataUnavailableError, ValueError) as e:
            if not phase["setup"]:
                raise
            return {"user_error": describe_validation_error(e) if isinstance(e, ValidationError) else str(e)}
        finally:
            with self._lock:
                self._stop.pop(run, None)
        assert result.state is not None
        final = warm_dir / "final.pt"
        _write_state(result.state, final)
        return {"finished": True, "state_path": str(final)}


class WarmPool:
    """This process's idle warm actors, keyed by the resources they hold; one job per actor at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[float, bool], list[tuple[Any, float]]] = {}
        self._reaper: threading.Thread | None = None

    def acquire(self, cpus: float, use_gpu: bool, settle_s: float = 0.0) -> tuple[Any, bool]:
        """An actor holding ``cpus`` cores (and a GPU): an idle one that still answers, else a new one (other
        processes asked for room first where Ray has too little free: :func:`ask_for_room`, with ``settle_s``).
        Returns ``(actor, reused)``."""
        key = (cpus, use_gpu)
        while True:
            with self._lock:
                idle = self._idle.get(key) or []
                actor = idle.pop()[0] if idle else None
            if actor is None:
                break
            try:
                ray.get(actor.ping.remote(), timeout=10)
                return actor, True
            except Exception:  # noqa: BLE001 - dead or unreachable: drop it, try the next
                _kill(actor)
        options: dict[str, Any] = {"num_cpus": cpus}
        if use_gpu:
            options["num_gpus"] = 1
        ask_for_room(cpus, 1.0 if use_gpu else 0.0, settle_s=settle_s)
        return WarmTrainer.options(**options).remote(), False

    def release(self, actor: Any, cpus: float, use_gpu: bool) -> None:
        """Give a healthy actor back; it is killed after :func:`idle_seconds` without a job."""
        if idle_seconds() == 0:
            _kill(actor)
            return
        with self._lock:
            self._idle.setdefault((cpus, use_gpu), []).append((actor, time.monotonic()))
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="warm-reaper", daemon=True)
                self._reaper.start()
        watch_demand()

    def release_idle(self) -> int:
        """Kill every idle actor (their cores are needed elsewhere); returns how many."""
        with self._lock:
            actors = [a for lst in self._idle.values() for a, _ in lst]
            self._idle.clear()
        for a in actors:
            _kill(a)
        return len(actors)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def _reap(self) -> None:
        while True:
            time.sleep(min(5.0, max(0.5, idle_seconds() / 4)))
            limit = idle_seconds()
            expired = []
            with self._lock:
                now = time.monotonic()
                for key, lst in self._idle.items():
                    keep = [(a, t) for a, t in lst if now - t < limit]
                    expired += [a for a, t in lst if now - t >= limit]
                    self._idle[key] = keep
                empty = not any(self._idle.values())
            for a in expired:
                _kill(a)
            if empty:
                with self._lock:
                    if not any(self._idle.values()):
                        self._reaper = None
                        return


def _kill(actor: Any) -> None:
    with contextlib.suppress(Exception):  # already gone
        ray.kill(actor, no_restart=True)


POOL = WarmPool()
_OTHER_IDLE: list[Callable[[], int]] = []  # other warm pools of this process (workers/warm_ddp.py's groups)


def register_idle_release(release: Callable[[], int]) -> None:
    """Have :func:`release_idle` also free another warm pool's idle resources (its ``release`` returns how many
    it freed)."""
    _OTHER_IDLE.append(release)


def release_idle() -> int:
    """Kill this process's idle warm actors (and close its idle warm DDP groups) before a run that needs Ray's
    resources (see the module doc)."""
    return POOL.release_idle() + sum(release() for release in _OTHER_IDLE)


# The demand board: idle warm resources of one job-worker process freed for another's run. release_idle() frees
# only this process's; a job worker among several (compose replicas, the soak's workers) would otherwise wait up
# to RE_WARM_IDLE_SECONDS for cores another process keeps warm and idle.
BOARD_NAME = "re-warm-demand-board"
BOARD_NAMESPACE = "robust-ensembles"
DEMAND_OPEN_S = 60.0  # how long a request for room stays open
WATCH_S = 2.0  # how often a process holding warm resources looks at the board

log = logging.getLogger(__name__)


class DemandBoard:
    """Requests for room, cluster-wide (one named, detached actor with no resources): a process whose run needs
    more than Ray has free opens one for :data:`DEMAND_OPEN_S`; processes holding warm resources free their idle
    ones while one is open."""

    def __init__(self) -> None:
        self._open_until = 0.0
        self._requests = 0

    def request(self, open_s: float) -> int:
        """Open (or extend) a request for room; returns how many have been made."""
        self._open_until = max(self._open_until, time.monotonic() + open_s)
        self._requests += 1
        return self._requests

    def open_for(self) -> float:
        """Seconds the current request stays open (0 when none is)."""
        return max(0.0, self._open_until - time.monotonic())

    def requests(self) -> int:
        return self._requests

    def close(self) -> None:
        """Close the open request, if any (the next run short of room opens another)."""
        self._open_until = 0.0


DemandBoardActor = ray.remote(num_cpus=0)(DemandBoard)


def demand_board() -> Any:
    """The cluster's demand board (created by the first process that asks)."""
    return DemandBoardActor.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached",
                                    get_if_exists=True).remote()


def ask_for_room(cpus: float, gpus: float = 0.0, *, settle_s: float = 0.0) -> bool:
    """Before a run that needs ``cpus`` cores and ``gpus`` GPUs of Ray's (after this process freed its own idle
    warm resources; ``settle_s``: how long their release may take to show): when the cluster's free resources
    fall short, open a request for room on the demand board, so other job-worker processes free their idle warm
    actors and groups within :data:`WATCH_S` seconds. Returns whether it asked.

    Ray's free resources are summed over nodes: a run whose workers cannot be placed on the nodes with free
    cores is not seen as short here (it waits for cores as before)."""
    deadline = time.monotonic() + settle_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0.0) + 1e-9 >= cpus and free.get("GPU", 0.0) + 1e-9 >= gpus:
            return False
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    try:
        n = ray.get(demand_board().request.remote(DEMAND_OPEN_S), timeout=10)
    except Exception as e:  # noqa: BLE001 - the run still starts; it waits for the cores as before
        log.warning("could not ask other workers for room: %s: %s", type(e).__name__, e)
        return False
    log.info("asked other workers to free idle warm resources (request %d; need %.3g CPU, %.3g GPU; free %s)",
             n, cpus, gpus, {k: free.get(k, 0.0) for k in ("CPU", "GPU")})
    return True


def make_room(cpus: float, gpus: float = 0.0) -> bool:
    """Before a run that needs ``cpus`` cores and ``gpus`` GPUs of Ray's: free this process's idle warm
    resources (:func:`release_idle`), then, where Ray still has too little free, ask the other job workers
    (:func:`ask_for_room`, given 2 s for what was freed here to show). Returns whether it asked."""
    freed = release_idle()
    return ask_for_room(cpus, gpus, settle_s=2.0 if freed else 0.0)


_HOLDERS: list[Callable[[], int]] = []  # how many warm resources this process's other pools hold (groups)
_watch_lock = threading.Lock()
_watcher: dict[str, threading.Thread | None] = {"thread": None}


def register_holder(count: Callable[[], int]) -> None:
    """Have the demand watcher also count another warm pool's resources (``count`` returns how many it holds)."""
    _HOLDERS.append(count)


def _holding() -> int:
    return POOL.idle_count() + sum(count() for count in _HOLDERS)


def watch_demand() -> None:
    """Start this process's demand watcher, once: while the process holds warm resources it frees the idle ones
    whenever a request for room is open on the board; it ends when the process holds none."""
    with _watch_lock:
        thread = _watcher["thread"]
        if thread is None or not thread.is_alive():
            thread = threading.Thread(target=_watch, name="warm-demand-watch", daemon=True)
            _watcher["thread"] = thread
            thread.start()


def _watch() -> None:
    board = None
    while True:
        time.sleep(WATCH_S)
        if _holding() == 0:
            with _watch_lock:
                if _holding() == 0:
                    _watcher["thread"] = None
                    return
            continue
        try:
            if not ray.is_initialized():
                continue
            board = board or demand_board()
            if ray.get(board.open_for.remote(), timeout=10) > 0:
                freed = release_idle()
                if freed:
                    log.info("freed %d idle warm resource(s): another worker's run needs room", freed)
        except Exception:  # noqa: BLE001 - Ray restarting or shut down: look again next time
            board = None


__all__ = ["POOL", "DemandBoard", "WarmPool", "WarmTrainer", "ask_for_room", "demand_board", "make_room",
           "newest_state", "register_holder", "release_idle", "warm_enabled", "watch_demand"]
