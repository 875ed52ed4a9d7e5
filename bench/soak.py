"""Kill soak: a seeded stream of small jobs through the real stack while a seeded chaos loop keeps killing it.

``python -m bench soak`` (issue #27; ``docs/reliability.md``, section *Soak*). Everything runs on this machine,
on loopback, and stops by itself:

* an embedded PostgreSQL that the chaos loop stops and starts (:class:`bench.faults.RestartablePostgres`:
  same socket and URL after a restart, as for a restarted PostgreSQL service);
* two API processes (``create_app`` under uvicorn, authentication on) behind that database; submissions go
  to them in turn and, when one does not answer, to the other with the same ``Idempotency-Key``;
* one local Ray (started by this process, on loopback, with its private token) and two job workers, each a
  ``robust-ensembles worker`` process connected to it, sharing one data directory, with a short lease;
* a seeded stream of small train jobs (baseline, 2 × LeNet-5, 2,048 MNIST images, 4 epochs, one Ray Train
  worker), evaluate jobs on finished train jobs (PGD-10 and FGSM on 100 images) and tune jobs (2 trials);
  one submission in five is sent twice (an idempotent replay).

The chaos loop injects, in a seeded order spread over the run: SIGKILLs of a job-worker process while it
runs a train job mid-epoch (its process group: the worker and its Ray driver die at once; the lease expires
and the other worker, or the killed one's replacement, resumes the job from its last checkpoint); SIGKILLs
of the Ray Train worker process of a running train job (Ray Train restarts the worker group inside the same
attempt; on the warm path, the default for one-worker jobs unless ``RE_WARM_TRAIN=0``, the run's warm actor,
which workers/warm.py replaces inside the attempt);
PostgreSQL restarts (down for 2-5 s); SIGKILLs of one API process (restarted 2 s later).

At the end, from ``job_events``, ``job_logs``, the artifacts and the answers, it checks:

1. every submitted job exists exactly once (none lost; the replays returned the same job);
2. every job ended in a terminal state, and entered one exactly once (one terminal event);
3. no two attempts of a job overlapped (:func:`bench.faults.ran_twice`: every claim from ``queued``,
   attempts one by one, no log line of an attempt after the next one started) - no claim made twice;
4. whole epochs trained again per recovery <= 1 (per train job: epoch log lines seen twice, against the
   faults that hit it);
5. every succeeded train job's ``ensemble.pt`` loads and its clean accuracy on the job's evaluation
   images equals the ``test_clean_acc`` the job reported.

Sizes (environment): ``RE_SOAK_WORKER_KILLS`` (default 20), ``RE_SOAK_RAY_KILLS`` (3), ``RE_SOAK_PG_RESTARTS``
(3), ``RE_SOAK_API_KILLS`` (1), ``RE_SOAK_MINUTES`` (a bound on the chaos phase, default 60),
``RE_SOAK_SEED`` (0), ``RE_SOAK_IN_FLIGHT`` (3), ``RE_SOAK_DRAIN_MINUTES`` (20), ``RE_SOAK_DDP_SHARE`` (0: the
share of train jobs sent with two Ray Train workers; they run on warm DDP groups unless ``RE_WARM_DDP=0``, and
the Ray kill then hits a group's rank 0). ``tests/reliability/test_soak.py``
runs it CI-sized (2 worker kills, 1 of each other), in a process of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.faults import RestartablePostgres, ran_twice

TRAIN: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 2,
                         "epochs": 4, "batch_size": 64, "train_subset": 2048, "eval_subset": 200, "workers": 1}
EVALUATE: dict[str, Any] = {"n_examples": 100, "batch_size": 50,
                            "attacks": [{"name": "pgd", "eps": [0.1, 0.2], "steps": 10, "alpha_ratio": 0.25},
                                        {"name": "fgsm", "eps": [0.1, 0.2]}]}
TUNE: dict[str, Any] = {"search_space": {"label_smoothing": {"type": "choice", "values": [0.0, 0.1]}},
                        "num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 1, "val_size": 200,
                        "metric": "val_clean_acc", "mode": "max"}
FINAL = ("succeeded", "failed", "cancelled")
EPOCH_LINE = re.compile(r"^stage (\d+) epoch (\d+) ")
EPOCH_SECONDS = re.compile(r"\| ([0-9.]+)s(?: \||\s*$)")  # "stage 1 epoch 2 | loss 0.15 | ... | 4.1s"
WARM_PID = re.compile(r"warm trainer on host .*, pid (\d+): job \d+ of this process")  # workers/warm.py
GROUP_PID = re.compile(r"warm group rank 0 of \d+ on host .*, pid (\d+): job \d+ of this group")  # warm_ddp.py
FAULTS = ("worker_kill", "ray_train_worker_kill", "postgres_restart", "api_kill")

SERVER = r"""
import sys
import uvicorn
from pathlib import Path
from service.app import create_app
from service.settings import Settings

url, port, data_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
app = create_app(Settings(data_dir=data_dir, database_url=url, auth=True), warm=False)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


@dataclass
class SoakConfig:
    """What one soak run injects and submits."""

    worker_kills: int = 20
    ray_kills: int = 3
    pg_restarts: int = 3
    api_kills: int = 1
    minutes: float = 60.0  # bound on the chaos phase; the drain after it has its own bound
    seed: int = 0
    in_flight: int = 3  # jobs kept queued or running while the chaos lasts
    lease_seconds: float = 6.0
    drain_minutes: float = 20.0
    ddp_share: float = 0.0  # of the train jobs: sent with workers 2 (on a warm DDP group unless RE_WARM_DDP=0)

    @classmethod
    def from_env(cls) -> SoakConfig:
        e = os.environ
        return cls(worker_kills=int(e.get("RE_SOAK_WORKER_KILLS", 20)), ray_kills=int(e.get("RE_SOAK_RAY_KILLS", 3)),
                   pg_restarts=int(e.get("RE_SOAK_PG_RESTARTS", 3)), api_kills=int(e.get("RE_SOAK_API_KILLS", 1)),
                   minutes=float(e.get("RE_SOAK_MINUTES", 60)), seed=int(e.get("RE_SOAK_SEED", 0)),
                   in_flight=int(e.get("RE_SOAK_IN_FLIGHT", 3)),
                   drain_minutes=float(e.get("RE_SOAK_DRAIN_MINUTES", 20)),
                   ddp_share=float(e.get("RE_SOAK_DDP_SHARE", 0)))


@dataclass
class Injection:
    """One fault: what, when (seconds since the start), and which job it hit (worker and Ray kills)."""

    fault: str
    at_s: float
    job_id: str | None = None
    detail: str = ""


@dataclass
class SoakLog:
    """What happened during the run (the checks read it together with the database)."""

    injections: list[Injection] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    submitted: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    kinds: dict[str, str] = field(default_factory=dict)  # job id -> kind
    replays: int = 0
    replay_mismatches: list[str] = field(default_factory=list)
    submit_retries: int = 0
    errors: list[str] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process in its own session (so that a SIGKILL takes its whole group), restartable."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.cmd, self.env, self.log_dir = name, cmd, env, log_dir
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.generation += 1
        log = open(self.log_dir / f"{self.name}.{self.generation}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a worker finishes or releases its job), then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()


class Soak:
    """One soak run: the stack, the submitter, the chaos loop and the final checks."""

    def __init__(self, cfg: SoakConfig, root: Path | None = None) -> None:
        self.cfg = cfg
        self.root = root or Path(tempfile.mkdtemp(prefix="re-soak-"))
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(cfg.seed)  # the chaos loop's and the API choice's
        self.stream_rng = random.Random(cfg.seed + 1)  # the job stream's own, so it does not depend on timing
        self.ddp_rng = random.Random(cfg.seed + 2)  # which train jobs are DDP (RE_SOAK_DDP_SHARE)
        self.log = SoakLog()
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.pg: RestartablePostgres | None = None
        self.apis: list[Proc] = []
        self.ports: list[int] = []
        self.workers: list[Proc] = []
        self.token = ""
        self.url = ""
        self.engine: Any = None

    # ------------------------------------------------------------------------------------- the stack
    def start(self) -> None:
        import ray

        if ray.is_initialized():  # its workers must reach a Ray this soak started, with its own private token
            raise RuntimeError("the soak starts its own local Ray: run it in a process without one "
                               "(python -m bench soak)")
        from service import migrate
        from service.auth import TokenStore
        from service.db import make_engine
        from workers.worker import connect_ray

        self.pg = RestartablePostgres(self.root / "pg")
        self.url = self.pg.new_database()
        migrate.upgrade(self.url)
        self.engine = make_engine(self.url)
        self.token = TokenStore(self.engine).create("soak")[0]
        connect_ray(None, temp_dir=tempfile.mkdtemp(prefix="rs-", dir="/tmp"), num_cpus=2)
        import ray

        gcs = ray.get_runtime_context().gcs_address
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RE_HEARTBEAT_SECONDS": "1",
               "RE_RETRY_BACKOFF_SECONDS": "1", "RE_POLL_SECONDS": "1"}
        for i in range(2):
            port = _free_port()
            self.ports.append(port)
            self.apis.append(Proc(f"api{i}", [sys.executable, "-c", SERVER, self.url, str(port), str(self.data_dir)],
                                  env, self.log_dir))
        for i in range(2):
            self.workers.append(Proc(f"worker{i}", [sys.executable, "-m", "workers.main", "worker", "--address", gcs,
                                                    "--database-url", self.url, "--data-dir", str(self.data_dir),
                                                    "--lease-seconds", str(self.cfg.lease_seconds)],
                                     env, self.log_dir))
        for p in self.apis + self.workers:
            p.start()
        for i in range(2):
            self._wait_api(i, 120)

    def close(self) -> None:
        for p in self.workers:
            p.stop(60)
        for p in self.apis:
            p.stop(15)
        import ray

        ray.shutdown()
        if self.engine is not None:
            self.engine.dispose()
        if self.pg is not None:
            self.pg.close()

    def _wait_api(self, i: int, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.ports[i]}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"API {i} did not become ready in {timeout:.0f} s (see {self.log_dir})")

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------------------------- the stream
    def _post(self, body: dict[str, Any], key: str, timeout: float = 180) -> dict[str, Any]:
        """POST /v1/jobs with ``key`` to the APIs in turn until one answers 201/200 (or 4xx: an error)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        deadline = time.monotonic() + timeout
        i = self.rng.randrange(2)
        while True:
            port = self.ports[i % 2]
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=body, headers=headers, timeout=30)
                if r.status_code in (200, 201):
                    return dict(r.json())
                if r.status_code < 500:
                    raise RuntimeError(f"submission {key} refused: {r.status_code} {r.text[:300]}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"submission {key}: no API answered within {timeout:.0f} s")
            with self.lock:
                self.log.submit_retries += 1
            i += 1
            time.sleep(1.0)

    def _db(self, sql: str, **params: Any) -> list[Any]:
        """A read, retried while PostgreSQL restarts."""
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        for _ in range(120):
            try:
                with self.engine.connect() as c:
                    return list(c.execute(text(sql), params).all())
            except OperationalError:
                time.sleep(0.5)
        raise RuntimeError("the database did not come back within a minute")

    def _active(self) -> int:
        ids = list(self.log.submitted.values())
        if not ids:
            return 0
        rows = self._db("SELECT count(*) AS n FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                        "AND status NOT IN ('succeeded', 'failed', 'cancelled')", ids=ids)
        return int(rows[0].n)

    def _train_spec(self, seed: int) -> dict[str, Any]:
        """A train job's spec: one Ray Train worker, or two (DDP) for ``ddp_share`` of them (a draw of its own,
        made only when the share is set: the stream of a soak without DDP jobs is as before)."""
        if self.cfg.ddp_share > 0 and self.ddp_rng.random() < self.cfg.ddp_share:
            return {**TRAIN, "seed": seed, "workers": 2}
        return {**TRAIN, "seed": seed}

    def _next_job(self, n: int) -> dict[str, Any]:
        seed = self.cfg.seed * 1000 + n
        trains = [j for j, k in self.log.kinds.items() if k == "train"]
        roll = self.stream_rng.random()
        if n < 2:  # the first two are train jobs: the chaos loop's kills need runs to hit
            return {"kind": "train", "spec": self._train_spec(seed)}
        if roll < 0.15 and trains:
            return {"kind": "evaluate", "spec": {**EVALUATE, "target_job": self.stream_rng.choice(trains),
                                                 "seed": seed}}
        if roll < 0.25:
            return {"kind": "tune", "spec": {**TUNE, "base": {**TRAIN, "epochs": 2, "train_subset": 1024},
                                             "seed": seed}}
        return {"kind": "train", "spec": self._train_spec(seed)}

    def submitter(self, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            try:
                if self._active() >= self.cfg.in_flight:
                    stop.wait(2.0)
                    continue
                body = self._next_job(n)
                key = f"soak-{self.cfg.seed}-{n:04d}"
                job = self._post(body, key)
                with self.lock:
                    self.log.submitted[key] = job["id"]
                    self.log.kinds[job["id"]] = body["kind"]
                if self.stream_rng.random() < 0.2:  # an idempotent replay: must return the same job
                    again = self._post(body, key)
                    with self.lock:
                        self.log.replays += 1
                        if again["id"] != job["id"]:
                            self.log.replay_mismatches.append(key)
                n += 1
            except Exception as e:  # noqa: BLE001 - recorded and checked at the end
                with self.lock:
                    self.log.errors.append(f"submitter: {e}")
                stop.wait(2.0)

    # ------------------------------------------------------------------------------------- the chaos
    def _running_train_jobs(self) -> list[Any]:
        return self._db("SELECT id, lease_owner, attempts FROM jobs WHERE kind = 'train' AND status = 'running'")

    def _epochs_logged(self, job_id: str, attempt: int) -> tuple[int, float]:
        """Epoch lines logged by ``attempt`` of the job, and the last one's duration (s; 0 when none)."""
        rows = self._db("SELECT line FROM job_logs WHERE job_id = CAST(:id AS uuid) AND attempt = :a ORDER BY id",
                        id=job_id, a=attempt)
        lines = [r.line for r in rows if EPOCH_LINE.match(r.line)]
        last = EPOCH_SECONDS.search(lines[-1]) if lines else None
        return len(lines), float(last.group(1)) if last else 0.0

    def _mid_epoch_target(self) -> tuple[Any, int, float] | None:
        """A running train job with at least one epoch logged in its attempt and not yet at its last."""
        for row in self._running_train_jobs():
            done, seconds = self._epochs_logged(str(row.id), row.attempts)
            if 1 <= done < TRAIN["epochs"]:
                return row, done, seconds
        return None

    def _into_the_epoch(self, epoch_seconds: float) -> None:
        """Sleep into the epoch after the one just logged: 30-70 % of the last epoch's duration."""
        time.sleep(self.rng.uniform(0.3, 0.7) * (epoch_seconds or 2.0))

    def worker_kill(self) -> Injection | None:
        found = self._mid_epoch_target()
        if found is None:
            return None
        row, done, seconds = found
        owner_pid = int(str(row.lease_owner).split(":")[1]) if row.lease_owner else -1
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None and w.pid == owner_pid:
                self._into_the_epoch(seconds)
                w.kill()
                w.start()  # its replacement joins at once; the job waits for its lease to expire
                return Injection("worker_kill", self.now(), str(row.id), f"{w.name} after {done} epoch(s)")
        return None

    def ray_train_worker_kill(self) -> Injection | None:
        from ray._private import state

        running = self._running_train_jobs()
        if len(running) != 1:  # one train run at a time: the killed process belongs to it
            return None
        row = running[0]
        done, seconds = self._epochs_logged(str(row.id), row.attempts)
        if not 1 <= done < TRAIN["epochs"]:
            return None
        rows = self._db("SELECT line FROM job_logs WHERE job_id = CAST(:id AS uuid) AND attempt = :a "
                        "ORDER BY id", id=str(row.id), a=row.attempts)
        group = [int(m.group(1)) for r in rows if (m := GROUP_PID.search(r.line))][-1:]
        warm = [int(m.group(1)) for r in rows if (m := WARM_PID.search(r.line))][-1:]
        if group:  # a DDP job on a warm group (workers/warm_ddp.py): its rank 0, named by the attempt's log
            pids, kind = group, "warm DDP group rank 0"
        elif warm:  # the warm path (the default for one worker): the run's warm actor
            pids, kind = warm, "warm trainer"
        else:  # Ray Train's own run: its worker
            actors = state.actors(actor_state_name="ALIVE").values()
            pids = [int(a["Pid"]) for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]
            kind = "Ray Train worker"
        if len(pids) != 1:
            return None
        self._into_the_epoch(seconds)
        try:
            os.kill(pids[0], signal.SIGKILL)
        except ProcessLookupError:
            return None
        return Injection("ray_train_worker_kill", self.now(), str(row.id),
                         f"{kind} pid {pids[0]} after {done} epoch(s)")

    def postgres_restart(self) -> Injection:
        assert self.pg is not None
        down = self.rng.uniform(2.0, 5.0)
        self.pg.stop()
        time.sleep(down)
        self.pg.start()
        return Injection("postgres_restart", self.now(), None, f"down {down:.1f} s")

    def api_kill(self) -> Injection:
        i = self.rng.randrange(2)
        self.apis[i].kill()
        time.sleep(2.0)
        self.apis[i].start()
        self._wait_api(i, 120)
        return Injection("api_kill", self.now(), None, f"api{i}")

    def chaos(self, stop: threading.Event) -> None:
        plan = (["worker_kill"] * self.cfg.worker_kills + ["ray_train_worker_kill"] * self.cfg.ray_kills
                + ["postgres_restart"] * self.cfg.pg_restarts + ["api_kill"] * self.cfg.api_kills)
        self.rng.shuffle(plan)
        deadline = self.cfg.minutes * 60
        for fault in plan:
            # wait for a moment where the fault can hit what it is meant to hit (a train job mid-run)
            while not stop.is_set() and self.now() < deadline:
                try:
                    inj = getattr(self, fault)()
                except Exception as e:  # noqa: BLE001 - a failed injection is recorded, the run goes on
                    with self.lock:
                        self.log.errors.append(f"{fault}: {e}")
                    inj = None
                if inj is not None:
                    with self.lock:
                        self.log.injections.append(inj)
                    print(f"[soak {inj.at_s:7.1f}s] {inj.fault} {inj.detail} {inj.job_id or ''}", flush=True)
                    stop.wait(self.rng.uniform(3.0, 8.0))
                    break
                stop.wait(0.5)
            else:
                with self.lock:
                    self.log.skipped[fault] += 1

    # ------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        self.start()
        try:
            stop = threading.Event()
            sub = threading.Thread(target=self.submitter, args=(stop,), name="soak-submitter", daemon=True)
            sub.start()
            self.chaos(stop)
            stop.set()
            sub.join(240)
            chaos_s = self.now()
            self._drain(self.cfg.drain_minutes * 60)
            drained_s = self.now()
            figures = self.check()
            figures.update(chaos_s=round(chaos_s, 1), wall_s=round(drained_s, 1))
            return figures
        finally:
            self.close()

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._active() > 0:
            time.sleep(2.0)

    # ------------------------------------------------------------------------------------- the checks
    def check(self) -> dict[str, Any]:
        """The invariants (module docstring) from the database, the logs and the artifacts; the figures."""
        import torch

        from ensemble_core.checkpoint import load_ensemble
        from ensemble_core.data import load_dataset, test_subset
        from ensemble_core.training import clean_accuracy
        from service.settings import Settings
        from workers.warm import warm_enabled

        torch.set_num_threads(1)
        settings = Settings(data_dir=self.data_dir, database_url=self.url)
        ids = list(self.log.submitted.values())
        rows = {str(r.id): r for r in self._db(
            "SELECT id, kind, status, attempts, infra_failures, error, result, idempotency_key FROM jobs "
            "WHERE id = ANY(CAST(:ids AS uuid[]))", ids=ids)}
        keyed = Counter(r.idempotency_key for r in rows.values())
        problems: list[str] = []
        lost = [k for k, j in self.log.submitted.items() if j not in rows]
        problems += [f"job of key {k} lost" for k in lost]
        problems += [f"key {k} holds {n} jobs" for k, n in keyed.items() if n != 1]
        problems += [f"replay of {k} returned another job" for k in self.log.replay_mismatches]
        statuses = Counter(r.status for r in rows.values())
        not_final = [j for j, r in rows.items() if r.status not in FINAL]
        problems += [f"job {j} ended {rows[j].status}" for j in not_final]
        terminal = {str(r.job_id): int(r.n) for r in self._db(
            "SELECT job_id, count(*) AS n FROM job_events WHERE job_id = ANY(CAST(:ids AS uuid[])) "
            "AND to_status IN ('succeeded', 'failed', 'cancelled') GROUP BY job_id", ids=ids)}
        problems += [f"job {j} entered a terminal state {terminal.get(j, 0)} times" for j in rows
                     if rows[j].status in FINAL and terminal.get(j, 0) != 1]
        with self.engine.connect() as c:
            twice = [j for j in rows if ran_twice(c, j)]
        problems += [f"job {j} was run by two attempts at once" for j in twice]
        # epochs trained again, per train job, against its recoveries: the faults that hit it, plus re-queues
        # the chaos loop did not cause (a lease that expired because a loaded machine delayed the heartbeats:
        # counted and reported, each allowed its one epoch like any recovery)
        hits = Counter(i.job_id for i in self.log.injections if i.job_id)
        worker_hits = Counter(i.job_id for i in self.log.injections if i.job_id and i.fault == "worker_kill")
        requeues = {str(r.job_id): int(r.n) for r in self._db(
            "SELECT job_id, count(*) AS n FROM job_events WHERE job_id = ANY(CAST(:ids AS uuid[])) "
            "AND event = 'requeued' GROUP BY job_id", ids=ids)}
        unprovoked = {j: max(0, requeues.get(j, 0) - worker_hits.get(j, 0)) for j in rows}
        redone: dict[str, int] = {}
        for j, r in rows.items():
            if r.kind != "train":
                continue
            lines = [(int(m.group(1)), int(m.group(2))) for x in self._db(
                "SELECT line FROM job_logs WHERE job_id = CAST(:id AS uuid) ORDER BY id", id=j)
                if (m := EPOCH_LINE.match(x.line))]
            redone[j] = len(lines) - len(set(lines))
            allowed = hits.get(j, 0) + unprovoked[j]
            if redone[j] > allowed:
                problems.append(f"job {j}: {redone[j]} epoch(s) trained again after {allowed} recoveries")
        # every succeeded train job's checkpoint loads and gives the accuracy it reported
        test = test_subset(load_dataset("mnist", "test"), "report", n=TRAIN["eval_subset"])
        verified = 0
        for j, r in rows.items():
            if r.kind != "train" or r.status != "succeeded":
                continue
            result = r.result if isinstance(r.result, dict) else json.loads(r.result)
            path = settings.job_artifacts_dir(j) / "ensemble.pt"
            try:
                acc = clean_accuracy(load_ensemble(path), test)["acc"]
            except Exception as e:  # noqa: BLE001 - a checkpoint that does not load is a finding
                problems.append(f"job {j}: {path} does not load ({e})")
                continue
            if acc != result["metrics"]["test_clean_acc"]:
                problems.append(f"job {j}: ensemble.pt gives {acc}, the job reported "
                                f"{result['metrics']['test_clean_acc']}")
            verified += 1
        injected = Counter(i.fault for i in self.log.injections)
        recoveries = sum(hits.values()) + sum(unprovoked.values())
        return {
            "config": {**asdict(self.cfg), "warm_path": "on" if warm_enabled() else "off"},
            "injections": {f: injected.get(f, 0) for f in FAULTS},
            "injections_skipped": dict(self.log.skipped),
            "jobs": len(rows), "jobs_by_kind": dict(Counter(r.kind for r in rows.values())),
            "jobs_by_status": dict(statuses),
            "jobs_lost": len(lost), "jobs_run_twice_at_once": len(twice),
            "jobs_not_terminal": len(not_final),
            "recoveries": recoveries, "requeues_without_an_injected_fault": sum(unprovoked.values()),
            "epochs_redone_total": sum(redone.values()),
            "epochs_redone_max_per_job": max(redone.values(), default=0),
            "checkpoints_verified": verified,
            "replays": self.log.replays, "submit_retries": self.log.submit_retries,
            "errors": self.log.errors, "problems": problems,
            "injection_log": [asdict(i) for i in self.log.injections],
            "logs_dir": str(self.log_dir),
        }


def run() -> None:
    """``python -m bench soak``."""
    from bench.common import header, save

    cfg = SoakConfig.from_env()
    load = os.getloadavg()[0]
    print(header(f"kill soak: {cfg.worker_kills} job-worker kills, {cfg.ray_kills} Ray Train worker kills, "
                 f"{cfg.pg_restarts} PostgreSQL restarts, {cfg.api_kills} API kills, seed {cfg.seed}", load))
    figures = Soak(cfg).run()
    path = save("soak", {"figures": figures}, load)
    print(json.dumps({k: v for k, v in figures.items() if k != "injection_log"}, indent=2))
    print(f"soak: {figures['jobs']} jobs ({figures['jobs_by_status']}), injections {figures['injections']}, "
          f"lost {figures['jobs_lost']}, run twice {figures['jobs_run_twice_at_once']}, epochs redone "
          f"{figures['epochs_redone_total']} over {figures['recoveries']} recoveries, "
          f"{len(figures['problems'])} problem(s); {figures['wall_s']:.0f} s -> {path}")


__all__ = ["Soak", "SoakConfig", "run"]
