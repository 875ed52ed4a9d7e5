"""The worker: lease jobs from the Postgres queue and run them (``robust-ensembles worker``).

One loop per worker process::

    sweep expired leases  ->  claim (FOR UPDATE SKIP LOCKED)  ->  run the job  ->  final transition
          ^                                                                           |
          +------------- wait for NOTIFY re_jobs (or the poll interval) <-------------+

While a job runs, a heartbeat thread extends its lease every few seconds and learns whether a cancel
was requested or the lease was lost; the runner polls ``should_stop()`` (cheap: it reads flags the
heartbeat thread sets) and stops within seconds. The runners (``workers.ray_train``,
``workers.ray_eval``, ``workers.ray_tune``) classify their failures with :mod:`workers.errors`:

- :class:`~workers.errors.JobCancelled` -> ``cancelled`` (or, when this worker is shutting down, the
  job is handed back to the queue without counting the attempt, and resumes from its checkpoint);
- :class:`~workers.errors.UserError` -> ``failed`` at once, never retried;
- :class:`~workers.errors.InfrastructureError` (and a lease that expired because the worker died) ->
  retried with its own exponential backoff, **not** charged to ``max_attempts``, up to the queue's
  ``max_infra_failures``;
- anything else -> transient: retried with exponential backoff until ``max_attempts``.

The same Ray Train run name (the job id) makes the next attempt resume from its last checkpoint.

Nothing here imports torch or Ray at import time; the runners are imported when a job needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from service.db import libpq_url, make_engine
from service.models import CLAIMABLE_KINDS
from service.queue import Lease, Queue
from service.settings import Settings
from workers.errors import InfrastructureError, JobCancelled, JobPreempted, UserError
from workers.tfevents import TENSORBOARD_DIR, EventFileWriter

log = logging.getLogger("robust_ensembles.worker")

NOTIFY_CHANNEL = "re_jobs"
MAX_ERROR_CHARS = 4000
# Where an epoch is (the point's step and the job's progress), not a measurement: not stored as metrics.
EPOCH_COORDINATES = frozenset({"epoch", "global_epoch", "stage", "total_epochs"})


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class JobRun:
    """One attempt of one job as its runner sees it: callbacks into the queue, and the stop flags."""

    lease: Lease
    queue: Queue
    settings: Settings
    worker_stopping: threading.Event
    cancel_requested: bool = False
    preempt_requested: bool = False  # a job of higher priority waits: stop at the next epoch checkpoint
    lease_lost: bool = False
    deadline_at: float | None = None  # time.monotonic() value of the job's deadline (None: no deadline)
    _last_progress: float = field(default=0.0, repr=False)
    _events: EventFileWriter | None = field(default=None, repr=False)

    @property
    def job_id(self) -> str:
        return str(self.lease.job_id)

    @property
    def artifacts_dir(self) -> Path:
        return self.settings.job_artifacts_dir(self.job_id)

    @property
    def deadline_passed(self) -> bool:
        return self.deadline_at is not None and time.monotonic() >= self.deadline_at

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lease_lost or self.worker_stopping.is_set() or self.deadline_passed

    def log(self, line: str) -> None:
        """A log line of the job: stored in Postgres (readable over REST) and echoed to the worker's log."""
        lines = str(line).rstrip("\n").splitlines() or [""]
        log.info("[job %s] %s", self.job_id[:8], "\n".join(lines))
        try:
            self.queue.append_logs(self.lease.job_id, lines, self.lease.attempt)
        except Exception as e:  # a lost log line must not kill a training run
            log.warning("could not store a log line of job %s: %s", self.job_id, e)

    def on_epoch(self, metrics: Mapping[str, Any]) -> None:
        """Per-epoch metrics of a train job: stored as points at step ``global_epoch``; progress updated."""
        step = int(metrics.get("global_epoch") or metrics.get("epoch") or 0)
        total = int(metrics.get("total_epochs") or 0) or None
        try:
            values = {k: v for k, v in metrics.items() if k not in EPOCH_COORDINATES}
            self.queue.record_metrics(self.lease.job_id, step, values, self.lease.attempt)
            stage = metrics.get("stage_name")
            if stage is None and metrics.get("stage") is not None:
                stage = f"stage {int(metrics['stage']) + 1}"
            self.queue.set_progress(self.lease, step / total if total else 0.0, stage=stage, epoch=step,
                                    total_epochs=total)
        except Exception as e:
            log.warning("could not store the metrics of job %s: %s", self.job_id, e)
        self.write_tensorboard(step, metrics)

    def backfill_epochs(self, history: Sequence[Mapping[str, Any]]) -> list[int]:
        """Store the metrics of the finished run's epochs that have no stored point: an epoch that an earlier
        attempt checkpointed but died before reporting is never trained again on resume, and an epoch reported
        during a database outage was not stored, so only the run's history (every epoch, kept in the checkpoint)
        still has them. Points already stored are kept. Returns the steps stored; database errors propagate
        (the caller retries)."""
        have = self.queue.metric_steps(self.lease.job_id)
        done = []
        for metrics in history:
            step = int(metrics.get("global_epoch") or metrics.get("epoch") or 0)
            if step in have:
                continue
            values = {k: v for k, v in metrics.items() if k not in EPOCH_COORDINATES}
            if self.queue.record_metrics(self.lease.job_id, step, values, self.lease.attempt, overwrite=False):
                done.append(step)
                self.write_tensorboard(step, metrics)
        if done:
            self.log(f"stored the metrics of epoch(s) {', '.join(map(str, done))} from the run's history (not "
                     "reported while it ran: an earlier attempt's checkpoint, or a database outage)")
        return done

    def write_tensorboard(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append an epoch's numbers to this attempt's TensorBoard event file (artifact ``tensorboard/``)."""
        try:
            if self._events is None:
                self._events = EventFileWriter(self.artifacts_dir / TENSORBOARD_DIR,
                                               suffix=f".attempt{self.lease.attempt}")
            self._events.add_scalars(step, {k: v for k, v in metrics.items() if k not in EPOCH_COORDINATES})
        except Exception as e:  # the event file is a convenience: the metrics are in Postgres
            log.warning("could not write the TensorBoard events of job %s: %s", self.job_id, e)

    def on_progress(self, fraction: float, stage: str) -> None:
        """Progress of an evaluate job (fraction 0..1 and what it is doing)."""
        try:
            self.queue.set_progress(self.lease, fraction, stage=stage)
        except Exception as e:
            log.warning("could not store the progress of job %s: %s", self.job_id, e)

    def on_trials(self, trials: list[dict[str, Any]]) -> None:
        """A tune job's trials, mirrored as child jobs of kind ``trial``."""
        try:
            self.queue.upsert_trials(self.lease.job_id, trials)
            done = sum(1 for t in trials if str(t.get("status", "")).upper() in ("TERMINATED", "ERROR"))
            total = int(self.lease.spec.get("num_samples") or len(trials) or 1)
            self.queue.set_progress(self.lease, min(done / total, 1.0), stage=f"{done}/{total} trials done")
        except Exception as e:
            log.warning("could not store the trials of job %s: %s", self.job_id, e)


Runner = Callable[[JobRun], dict[str, Any]]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ runners
def run_train(run: JobRun) -> dict[str, Any]:
    from workers.ray_train import run_train_job

    out = run_train_job(dict(run.lease.spec), job_id=run.job_id, storage_path=str(run.settings.ray_storage_path),
                        artifacts_dir=str(run.artifacts_dir), on_epoch=run.on_epoch, should_stop=run.should_stop,
                        log=run.log, should_preempt=lambda: run.preempt_requested)
    return {**out, "checkpoint": "ensemble.pt"}


def resolve_checkpoints(spec: Mapping[str, Any], settings: Settings) -> dict[str, str | None]:
    """``{"target", "surrogate", "baseline"}`` -> checkpoint paths: a registered model's folder (``*_model``), a
    referenced train job's ``ensemble.pt`` (in its artifacts directory) or the ``*_checkpoint`` path given in the
    spec."""
    pairs = {"target": ("target_job", "target_checkpoint"),
             "surrogate": ("transfer_from_job", "transfer_from_checkpoint"),
             "baseline": ("baseline_job", "baseline_checkpoint")}
    out: dict[str, str | None] = {}
    for role, (job_key, path_key) in pairs.items():
        job_ref, path = spec.get(job_key), spec.get(path_key)
        model_key = job_key.replace("_job", "_model")
        if spec.get(model_key):  # a registered model: its folder (config.json + model.safetensors)
            folder = settings.models_root / str(spec[model_key])
            if not (folder / "config.json").is_file():
                raise UserError(f"{model_key}: no registered model {spec[model_key]} (deleted?)")
            out[role] = str(folder)
        elif job_ref:
            p = settings.job_artifacts_dir(str(job_ref)) / "ensemble.pt"
            if not p.is_file():
                raise UserError(f"{job_key}: train job {job_ref} has no ensemble.pt (looked in {p.parent})")
            out[role] = str(p)
        elif path:
            p = Path(str(path)).expanduser()
            if not p.is_file():
                raise UserError(f"{path_key}: no checkpoint file at {p}")
            out[role] = str(p)
        else:
            out[role] = None
    return out


def run_evaluate(run: JobRun) -> dict[str, Any]:
    from workers.ray_eval import run_evaluate_job

    checkpoints = resolve_checkpoints(run.lease.spec, run.settings)
    return run_evaluate_job(dict(run.lease.spec), job_id=run.job_id, artifacts_dir=str(run.artifacts_dir),
                            checkpoints=checkpoints, on_progress=run.on_progress, should_stop=run.should_stop,
                            log=run.log)


def run_tune(run: JobRun) -> dict[str, Any]:
    from workers.ray_tune import run_tune_job

    return run_tune_job(dict(run.lease.spec), job_id=run.job_id, storage_path=str(run.settings.ray_storage_path),
                        artifacts_dir=str(run.artifacts_dir), on_trials=run.on_trials, should_stop=run.should_stop,
                        log=run.log)


DEFAULT_RUNNERS: dict[str, Runner] = {"train": run_train, "evaluate": run_evaluate, "tune": run_tune}


# ------------------------------------------------------------------------------------------ the loop
class Worker:
    """Leases and runs jobs until ``stop()``; safe to run several in one process (each has its own id)."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None, worker_id: str | None = None,
                 runners: Mapping[str, Runner] | None = None, kinds: tuple[str, ...] = CLAIMABLE_KINDS) -> None:
        if engine is None:
            if not settings.database_url:
                raise ValueError("the worker needs settings.database_url")
            engine = make_engine(settings.database_url)
        self.settings = settings
        self.engine = engine
        self.queue = Queue(engine, lease_seconds=settings.lease_seconds,
                           backoff_base=settings.retry_backoff_seconds,
                           backoff_max=settings.retry_backoff_max_seconds,
                           default_max_attempts=settings.default_max_attempts,
                           max_infra_failures=settings.max_infra_failures)
        self.worker_id = worker_id or new_worker_id()
        self.runners = dict(runners if runners is not None else DEFAULT_RUNNERS)
        self.kinds = tuple(k for k in kinds if k in self.runners)
        self._stopping = threading.Event()
        self._listen_conn: Any = None
        self._last_sweep = 0.0
        self.jobs_run = 0
        self.housekeeper: Any = None  # service.housekeeping.Housekeeper while run() runs (Settings.housekeeping)

    # -------------------------------------------------------------- control
    def stop(self) -> None:
        """Ask the loop to end: a running job is stopped and handed back to the queue (not counted)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, max_jobs: int | None = None) -> None:
        """The main loop (blocking). Ends after ``stop()`` or after ``max_jobs`` jobs."""
        log.info("worker %s started (kinds: %s)", self.worker_id, ", ".join(self.kinds))
        if self.settings.housekeeping and self.housekeeper is None:
            from service.housekeeping import Housekeeper

            self.housekeeper = Housekeeper(self.engine, self.settings, self.queue, self.kinds)
            self.housekeeper.start()
        try:
            while not self.stopping:
                if max_jobs is not None and self.jobs_run >= max_jobs:
                    break
                try:
                    ran = self.run_once()
                except Exception as e:  # the database went away for a moment: wait and go on
                    log.warning("worker loop error: %s: %s", type(e).__name__, e)
                    self._close_listen()
                    self._stopping.wait(min(self.settings.poll_seconds, 5.0))
                    continue
                if not ran:
                    self.wait_for_work(self.settings.poll_seconds)
        finally:
            self._close_listen()
            if self.housekeeper is not None:
                self.housekeeper.stop()
                self.housekeeper = None
            log.info("worker %s stopped after %d job(s)", self.worker_id, self.jobs_run)

    def run_once(self) -> bool:
        """Sweep (now and then), claim one job and run it. False when there was nothing to run."""
        self.maybe_sweep()
        lease = self.queue.claim(self.worker_id, self.kinds)
        if lease is None:
            return False
        self.execute(lease)
        self.jobs_run += 1
        return True

    def maybe_sweep(self, force: bool = False) -> None:
        interval = max(min(self.settings.lease_seconds / 3, 5.0), 0.2)
        now = time.monotonic()
        if force or now - self._last_sweep >= interval:
            self._last_sweep = now
            for job_id, status in self.queue.sweep_expired():
                log.warning("job %s: lease expired, now %s", job_id, status)
            self.queue.fail_blocked_dependents()

    # -------------------------------------------------------------- waiting (LISTEN/NOTIFY + polling)
    def wait_for_work(self, timeout: float) -> None:
        """Block until a job notification arrives, ``timeout`` passes, or the worker is stopped."""
        deadline = time.monotonic() + timeout
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            chunk = min(left, 1.0)  # wake at least every second to notice stop()
            conn = self._listen()
            if conn is None:
                self._stopping.wait(chunk)
                continue
            try:
                for _ in conn.notifies(timeout=chunk, stop_after=1):
                    return
            except Exception as e:
                log.warning("LISTEN connection lost (%s); polling", e)
                self._close_listen()

    def _listen(self) -> Any:
        if self._listen_conn is not None:
            return self._listen_conn
        if not self.settings.database_url:
            return None
        try:
            import psycopg

            conn = psycopg.connect(libpq_url(self.settings.database_url), autocommit=True)
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._listen_conn = conn
        except Exception as e:
            log.warning("cannot LISTEN for jobs (%s); polling every %.0f s", e, self.settings.poll_seconds)
            return None
        return self._listen_conn

    def _close_listen(self) -> None:
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone anyway
                self._listen_conn.close()
            self._listen_conn = None

    # -------------------------------------------------------------- one job
    def execute(self, lease: Lease) -> str:
        """Run one leased job to its final transition; returns what happened (a status, or ``lease_lost``)."""
        deadline_at = None if lease.deadline_left is None else time.monotonic() + lease.deadline_left
        run = JobRun(lease, self.queue, self.settings, self._stopping, deadline_at=deadline_at)
        run.log(f"attempt {lease.attempt}/{lease.max_attempts} of {lease.kind} job started on worker "
                f"{self.worker_id}")
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(run, done), name=f"heartbeat-{run.job_id[:8]}",
                                daemon=True)
        beat.start()
        try:
            outcome = self._run_and_finish(run)
        finally:
            done.set()
            beat.join(timeout=10)
        log.info("job %s (%s) attempt %d: %s", run.job_id, lease.kind, lease.attempt, outcome)
        return outcome

    def _heartbeat_loop(self, run: JobRun, done: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_seconds):
            try:
                hb = self.queue.heartbeat(run.lease)
            except Exception as e:  # keep trying; the lease only ends when the sweeper takes it
                log.warning("heartbeat of job %s failed: %s", run.job_id, e)
                continue
            if not hb.ok:
                if not run.lease_lost:
                    log.warning("job %s: lease lost (expired and re-queued, or finished elsewhere)", run.job_id)
                run.lease_lost = True
            elif hb.cancel_requested and not run.cancel_requested:
                run.cancel_requested = True
                run.log("cancel requested: stopping")
            elif hb.preempt_requested and not run.preempt_requested:
                run.preempt_requested = True
                run.log("preemption requested by a job of higher priority: stopping at the next epoch checkpoint")

    def _run_and_finish(self, run: JobRun) -> str:
        lease = run.lease
        runner = self.runners.get(lease.kind)
        try:
            if runner is None:
                raise UserError(f"this worker cannot run {lease.kind!r} jobs")
            if run.deadline_passed:  # e.g. re-queued after its deadline: do not start it again
                return self._stopped(run, "deadline exceeded before this attempt started")
            run.artifacts_dir.mkdir(parents=True, exist_ok=True)
            result = runner(run)
        except JobPreempted as e:
            if run.lease_lost:
                return "lease_lost"
            if run.cancel_requested or self.stopping or run.deadline_passed:
                return self._stopped(run, f"stopped: {e}")
            reason = f"preempted: {e}"
            run.log(f"{reason}; back in the queue, it resumes from that checkpoint")
            status = self._final("preempt", lambda: self.queue.preempted(lease, reason))
            return "lease_lost" if status is None else ("preempted" if status == "queued" else status)
        except JobCancelled as e:
            return self._stopped(run, f"cancelled: {e}")
        except UserError as e:
            if run.lease_lost:
                return "lease_lost"
            message = _trim(str(e) or type(e).__name__)
            run.log(f"failed (not retried): {message}")
            self._final("fail", lambda: self.queue.fail(lease, message))
            return "failed"
        except Exception as e:
            if run.should_stop():  # the failure is most likely the stop itself (e.g. workers killed)
                return self._stopped(run, f"stopped ({type(e).__name__}: {e})")
            message = _trim(f"{type(e).__name__}: {e}")
            for line in traceback.format_exception(e)[-12:]:
                run.log(line.rstrip())
            if isinstance(e, InfrastructureError):  # not the job's fault: not charged to its max_attempts
                status = self._final("retry", lambda: self.queue.retry_infra(lease, message))
            else:
                status = self._final("retry", lambda: self.queue.retry_later(lease, message))
            if status is None:
                return "lease_lost"
            run.log(f"attempt {lease.attempt} failed: {message}; job is now {status}")
            return status
        except BaseException:  # KeyboardInterrupt / SystemExit in the worker thread: hand the job back
            self.queue.release(lease, "worker interrupted; the job was returned to the queue")
            raise
        if run.lease_lost:
            run.log("finished, but the lease was lost meanwhile: the result is left to the new attempt")
            return "lease_lost"
        if lease.kind == "train" and isinstance(result, Mapping):
            history = (result.get("results") or {}).get("history") or []
            try:  # before the job reads succeeded, so that its metrics are complete by then
                self._final("history metrics", lambda: run.backfill_epochs(history))
            except Exception as e:  # the result matters more than a metric point
                log.warning("could not store the history's metrics of job %s: %s", run.job_id, e)
        if not self._final("succeed", lambda: self.queue.succeed(lease, result)):
            return "lease_lost"
        run.log("succeeded")
        return "succeeded"

    def _stopped(self, run: JobRun, detail: str) -> str:
        if run.lease_lost:
            return "lease_lost"
        if run.deadline_passed and not run.cancel_requested and not self.stopping:
            message = (f"deadline exceeded: the job did not finish within its deadline_seconds of its first start "
                       f"(attempt {run.lease.attempt}); stopped, not retried")
            run.log(message)
            return "failed" if self._final("fail", lambda: self.queue.fail(run.lease, message)) else "lease_lost"
        if run.cancel_requested or not self.stopping:
            run.log(detail)
            cancelled = self._final("cancel", lambda: self.queue.mark_cancelled(run.lease, "cancelled by request"))
            return "cancelled" if cancelled else "lease_lost"
        # the worker is shutting down: the job goes back to the queue and resumes from its checkpoint
        run.log("worker shutting down: job returned to the queue (this attempt is not counted)")
        self._final("release", lambda: self.queue.release(
            run.lease, "worker shut down during the run; it resumes on the next attempt"))
        return "released"

    def _final(self, what: str, transition: Callable[[], T]) -> T:
        """A job's final transition, retried while PostgreSQL is unreachable (e.g. being restarted).

        Without this, a run that ends during a database restart would lose its outcome and be run again
        after its lease expired. Meanwhile the heartbeat thread keeps the lease alive (once the database
        answers), so no other worker takes the job; the statements are fenced, so a lease lost meanwhile
        makes the transition a no-op. Gives up (re-raises) after ``lease_seconds``.
        """
        give_up = time.monotonic() + max(self.settings.lease_seconds, 5.0)
        delay = 0.5
        while True:
            try:
                return transition()
            except (OperationalError, InterfaceError) as e:
                if time.monotonic() + delay > give_up:
                    raise
                reason = str(getattr(e, "orig", e)).strip().split("\n", 1)[0]
                log.warning("%s of a job: database unavailable (%s); retrying in %.1f s", what, reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _trim(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def connect_ray(address: str | None = None, *, temp_dir: str | Path | None = None,
                num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address``) or start a local one with its files under ``temp_dir``.

    A local Ray listens on 127.0.0.1 only and its token file is readable by its owner only
    (:mod:`workers.ray_local`; both set up before ``ray`` is imported, when Ray reads them).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Ray workers inherit it: no spin-waiting on 2 cores
    kwargs: dict[str, Any] = {}
    if not address:
        from workers.ray_local import LOOPBACK, keep_local_ray_on_loopback, private_ray_token

        keep_local_ray_on_loopback()
        if temp_dir is not None:
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
            kwargs["_temp_dir"] = str(temp_dir)
        import tempfile

        private_ray_token(temp_dir if temp_dir is not None else tempfile.mkdtemp(prefix="re-ray-token-"))
        kwargs["_node_ip_address"] = LOOPBACK
    import ray

    if ray.is_initialized():
        return
    env = {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        return
    ray.init(num_cpus=num_cpus, log_to_driver=False, configure_logging=False, **kwargs)


__all__ = ["DEFAULT_RUNNERS", "JobRun", "Worker", "connect_ray", "new_worker_id", "resolve_checkpoints"]
