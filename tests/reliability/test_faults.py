"""Fault injection with real processes: PostgreSQL, the API, the worker and Ray Train are the real ones.

Each test injects faults into a running service and asserts that no job is lost, none is run twice at
once (``job_events`` / attempt fencing, see ``conftest.Tally.account``), and how much work a recovery
redid. (A worker SIGKILLed mid-run, its lease expiring and the next worker resuming from the
checkpoint, and cancels of running and queued jobs are covered by
``tests/integration/test_service_e2e.py``.)

1. PostgreSQL stopped and started while the worker is idle and again while a job runs: the API
   answers 503 (not 500) while it is down and recovers without a restart; the same worker thread
   reconnects and finishes the job in its first attempt. PostgreSQL stopped at the moment a run hands
   in its result: the worker keeps the outcome until the database is back (no re-run).
2. The API process killed (SIGKILL) and later stopped (SIGTERM) while jobs are queued and running:
   the jobs run on, the restarted API serves them, an idempotent replay does not duplicate a job.
3. A Ray Train worker process SIGKILLed mid-run: Ray Train's ``FailureConfig`` restarts the worker
   group inside the same attempt, which resumes from the last checkpoint; the job's attempts stay 1.
4. A per-job deadline (``deadline_seconds``) passed: the run is stopped and the job fails, not retried.

Train budgets are tiny (baseline, lenet5, <= 2048 MNIST images, one Ray worker): the cost is the Ray
Train start-up of each run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from faultkit import RestartablePostgres, Tally

from service.app import create_app
from service.db import make_engine
from service.queue import Queue
from service.settings import Settings
from workers.errors import JobCancelled
from workers.worker import JobRun, Worker

pytestmark = pytest.mark.integration

TRAIN: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 2,
                         "epochs": 2, "batch_size": 64, "train_subset": 1024, "eval_subset": 200, "workers": 1,
                         "seed": 3}
FINAL = ("succeeded", "failed", "cancelled")
EPOCH_LINE = re.compile(r"^stage (\d+) epoch (\d+) ")


def settings_for(url: str, data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url=url, heartbeat_seconds=1.0, lease_seconds=30.0,
                    retry_backoff_seconds=1.0, poll_seconds=1.0)


class WorkerThread:
    """A real :class:`Worker` running its loop in a thread of the test process (the Ray driver)."""

    def __init__(self, settings: Settings) -> None:
        self.worker = Worker(settings)
        self.thread = threading.Thread(target=self.worker.run, name="reliability-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(120)


@pytest.fixture()
def db_settings(rpg_url: str, tmp_path: Path) -> Settings:
    return settings_for(rpg_url, tmp_path / "data")


@pytest.fixture()
def settings(db_settings: Settings, ray_session: None) -> Settings:
    return db_settings


@pytest.fixture()
def worker(settings: Settings) -> Iterator[WorkerThread]:
    w = WorkerThread(settings)
    try:
        yield w
    finally:
        w.stop()


def poll(get: Callable[[], Any], cond: Callable[[Any], bool], timeout: float, what: str) -> Any:
    """Call ``get`` until ``cond`` holds of its value (errors and 5xx while a part restarts are retried)."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        try:
            last = get()
            if cond(last):
                return last
        except (httpx.HTTPError, OSError) as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached in {timeout:.0f} s (last: {last!r})")


def job_of(http: Any, jid: str) -> dict[str, Any] | None:
    r = http.get(f"/v1/jobs/{jid}")
    return r.json() if r.status_code == 200 else None


def epoch_lines(http: Any, jid: str) -> list[tuple[int, int]]:
    """(stage, epoch) of every epoch-end log line of the job, in order."""
    items = http.get(f"/v1/jobs/{jid}/logs", params={"limit": 10000}).json()["items"]
    return [(int(m.group(1)), int(m.group(2))) for x in items if (m := EPOCH_LINE.match(x["line"]))]


def events_of(http: Any, jid: str) -> list[str]:
    return [e["event"] for e in http.get(f"/v1/jobs/{jid}/events").json()]


# ---------------------------------------------------------------------------------------- 1. PostgreSQL
def test_postgres_restarted_while_the_worker_is_idle_and_while_a_job_runs(
        settings: Settings, restartable_pg: RestartablePostgres, worker: WorkerThread, tally: Tally,
        caplog: pytest.LogCaptureFixture) -> None:
    t_start = time.monotonic()
    caplog.set_level(logging.WARNING)
    app = create_app(settings, warm=False)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        time.sleep(1.5)  # the worker is idle, waiting on LISTEN re_jobs

        # --- outage 1: the worker is idle
        restartable_pg.stop()
        tally.inject("postgres_restart_worker_idle")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "database not ready" in ready.json()["detail"]
        read = client.get(f"/v1/jobs/{uuid.uuid4()}")
        assert read.status_code == 503, read.text
        assert read.json()["detail"] == "database unavailable; retry shortly" and read.headers["Retry-After"]
        listing = client.get("/v1/jobs")
        assert listing.status_code == 503
        refused = client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN})
        assert refused.status_code == 503  # not accepted, so not lost: the client is told to retry
        time.sleep(2.0)  # the worker's loop meets the outage (LISTEN connection lost, claims fail)
        restartable_pg.start()
        poll(lambda: client.get("/readyz").status_code, lambda s: s == 200, 15, "API ready again")
        assert worker.thread.is_alive()
        seen = " ".join(r.getMessage() for r in caplog.records if r.name == "robust_ensembles.worker")
        assert "LISTEN connection lost" in seen or "worker loop error" in seen, seen

        # the same worker (no restart) takes a job submitted after the outage
        r = client.post("/v1/jobs", json={"kind": "train", "spec": {**TRAIN, "epochs": 4}})
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        poll(lambda: job_of(client, jid), lambda j: j is not None and (j["epoch"] or 0) >= 1, 180,
             "first epoch of the job")

        # --- outage 2: the job is running (heartbeats, metrics and log lines fail meanwhile)
        restartable_pg.stop()
        tally.inject("postgres_restart_job_running")
        assert client.get(f"/v1/jobs/{jid}").status_code == 503
        assert client.get(f"/v1/jobs/{jid}/logs").status_code == 503
        assert client.get("/readyz").status_code == 503
        time.sleep(3.0)
        restartable_pg.start()
        final = poll(lambda: job_of(client, jid), lambda j: j is not None and j["status"] in FINAL, 240,
                     "job finished")
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 1 and final["error"] is None  # finished by its first attempt, not re-run
        assert events_of(client, jid) == ["created", "started", "succeeded"]
        # the worker counts a job when execute() returns, a moment after the job's row says succeeded
        poll(lambda: worker.worker.jobs_run, lambda n: n >= 1, 30, "the worker's count of jobs run")
        assert worker.thread.is_alive() and worker.worker.jobs_run == 1
        beats = [r.getMessage() for r in caplog.records if "heartbeat of job" in r.getMessage()]
        assert beats, "the outage did not reach the running job's heartbeat"
        # every epoch was trained once: the run's own history (in its checkpoint) has 4 epochs
        history = client.get(f"/v1/jobs/{jid}/results").json()["results"]["history"]
        assert [h["global_epoch"] for h in history] == [1, 2, 3, 4], history
        lines = epoch_lines(client, jid)
        assert len(lines) == len(set(lines))  # no epoch logged twice (lines of the outage are missing)
        items = client.get(f"/v1/jobs/{jid}/metrics", params={"name": "epoch_time_s"}).json()["items"]
        assert sorted(int(p["step"]) for p in items) == [1, 2, 3, 4]  # the outage's from the history, at the end
        tally.redone("postgres_restart_job_running", 0)
        tally.account(make_engine(settings.database_url or ""), [jid])
    tally.tests["postgres_restarts"] = round(time.monotonic() - t_start, 1)


def test_postgres_down_when_a_run_ends_the_worker_keeps_its_outcome(
        db_settings: Settings, restartable_pg: RestartablePostgres, tally: Tally) -> None:
    """The database goes away at the moment a run hands in its result: the worker waits for it and
    records the outcome; the job is not run again after its lease expires. (The runner is a plain
    function, so this case needs no Ray: what is tested is the worker's final transition.)"""
    t_start = time.monotonic()
    restarter: list[threading.Timer] = []

    def runner(run: JobRun) -> dict[str, Any]:
        run.log("working")
        restartable_pg.stop()
        tally.inject("postgres_restart_at_run_end")
        restarter.append(threading.Timer(3.0, restartable_pg.start))
        restarter[0].start()
        return {"answer": 42, "attempt": run.lease.attempt}

    engine = make_engine(db_settings.database_url or "")
    queue = Queue(engine)
    job, _ = queue.submit("train", TRAIN)
    w = Worker(db_settings, runners={"train": runner})
    thread = threading.Thread(target=w.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker did not finish its job"
    assert restarter, [x["line"] for x in queue.logs(job["id"])]
    restarter[0].join(10)
    final = queue.get(job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 1, final
    assert queue.result(job["id"]) == {"answer": 42, "attempt": 1}
    assert [e["event"] for e in queue.events(job["id"])] == ["created", "started", "succeeded"]
    tally.redone("postgres_restart_at_run_end", 0)
    tally.account(engine, [str(job["id"])])
    tally.tests["postgres_restart_at_run_end"] = round(time.monotonic() - t_start, 1)


def test_a_job_past_its_deadline_is_stopped_and_failed_without_a_retry(db_settings: Settings, tally: Tally) -> None:
    """``deadline_seconds`` on submission: the worker stops the run when it passes and fails the job with a
    clear error, with attempts left unused. (The runner works until ``should_stop()``, like the Ray
    runners, whose stop path the cancel tests of ``test_service_e2e.py`` cover.)"""
    t_start = time.monotonic()

    def runner(run: JobRun) -> dict[str, Any]:
        while not run.should_stop():
            time.sleep(0.05)
        raise JobCancelled("stopped")

    app = create_app(db_settings, warm=False)
    with TestClient(app) as client:
        for bad in (0, -1, 10**9):
            r = client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN, "deadline_seconds": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "deadline_seconds", r.text
        r = client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN, "deadline_seconds": 2.5, "max_attempts": 3})
        assert r.status_code == 201 and r.json()["deadline_seconds"] == 2.5, r.text
        jid = r.json()["id"]
        w = Worker(db_settings, runners={"train": runner})
        thread = threading.Thread(target=w.run, kwargs={"max_jobs": 1}, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
        final = client.get(f"/v1/jobs/{jid}").json()
        assert final["status"] == "failed" and final["attempts"] == 1, final  # 2 attempts left, not used
        assert final["error"].startswith("deadline exceeded") and "not retried" in final["error"]
        assert events_of(client, jid) == ["created", "started", "failed"]
        took = (datetime.fromisoformat(final["finished_at"]) - datetime.fromisoformat(final["started_at"]))
        assert 2.5 <= took.total_seconds() < 8.0, took
    tally.account(make_engine(db_settings.database_url or ""), [jid], expected="failed")
    tally.inject("deadline_exceeded")
    tally.tests["deadline"] = round(time.monotonic() - t_start, 1)


# ---------------------------------------------------------------------------------------- 2. the API
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiProcess:
    """``robust-ensembles serve`` as a separate process (uvicorn), restartable on the same port."""

    def __init__(self, settings: Settings, port: int, log_path: Path) -> None:
        self.cmd = [sys.executable, "-m", "service.cli", "serve", "--database-url", str(settings.database_url),
                    "--data-dir", str(settings.data_dir), "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> float:
        """Start the API and wait until ``/readyz`` answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, "RE_AUTH": "0"}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        poll(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code, lambda s: s == 200, 90,
             f"API ready (log: {self.log_path})")
        return time.monotonic() - t0

    def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(30)
        self.proc = None


@pytest.fixture()
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    a = ApiProcess(settings, free_port(), tmp_path / "api.log")
    try:
        yield a
    finally:
        if a.proc is not None:
            a.stop(signal.SIGKILL)


def test_api_killed_and_restarted_while_jobs_are_queued_and_running(
        settings: Settings, api: ApiProcess, worker: WorkerThread, tally: Tally) -> None:
    """Job a (train) runs and job b (an evaluation of a, so it waits for a) is queued while the API is
    SIGKILLed and restarted, then stopped with SIGTERM and restarted: both finish, once each."""
    t_start = time.monotonic()
    api.start()
    http = httpx.Client(base_url=api.url, timeout=10)
    r = http.post("/v1/jobs", json={"kind": "train", "spec": {**TRAIN, "epochs": 3}}, headers={"Idempotency-Key": "a"})
    assert r.status_code == 201, r.text
    a = r.json()["id"]
    eval_req = {"kind": "evaluate", "spec": {"target_job": a, "n_examples": 50, "member_transfer": None,
                                             "attacks": [{"name": "pgd", "eps": [0.3], "steps": 5}]}}
    r = http.post("/v1/jobs", json=eval_req, headers={"Idempotency-Key": "b"})
    assert r.status_code == 201 and r.json()["depends_on"] == [a], r.text
    b = r.json()["id"]
    poll(lambda: job_of(http, a), lambda j: j["status"] == "running", 60, "job a running")
    assert job_of(http, b)["status"] == "queued"  # b waits for a

    # --- the API dies without a word while a runs and b waits
    api.stop(signal.SIGKILL)
    tally.inject("api_killed_sigkill")
    with pytest.raises(httpx.TransportError):
        http.get("/healthz")
    down_since = time.monotonic()
    time.sleep(1.0)
    api.start()
    print(f"API down {time.monotonic() - down_since:.1f} s after SIGKILL (restart included)")
    # the jobs are all there; a replayed submission does not create a third one
    replay = http.post("/v1/jobs", json=eval_req, headers={"Idempotency-Key": "b"})
    assert replay.status_code in (200, 201) and replay.json()["id"] == b
    assert replay.headers["Idempotent-Replayed"] == "true"
    listing = http.get("/v1/jobs").json()
    assert listing["total"] == 2 and {j["id"] for j in listing["items"]} == {a, b}

    # --- a graceful stop (SIGTERM) of the new API, a still running
    assert job_of(http, a)["status"] == "running"
    api.stop(signal.SIGTERM)
    tally.inject("api_stopped_sigterm")
    api.start()
    for jid in (a, b):
        final = poll(lambda jid=jid: job_of(http, jid), lambda j: j is not None and j["status"] in FINAL, 240,
                     f"job {jid} finished")
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        assert events_of(http, jid) == ["created", "started", "succeeded"]
        tally.redone("api_restart", 0)
    lines = epoch_lines(http, a)
    assert len(lines) == len(set(lines)) == 3  # every epoch trained once
    assert http.get(f"/v1/jobs/{a}/artifacts/ensemble.pt").status_code == 200
    assert http.get(f"/v1/jobs/{b}/results").json()["tables"]
    poll(lambda: worker.worker.jobs_run, lambda n: n >= 2, 30, "the worker's count of jobs run")
    assert api.starts == 3 and worker.worker.jobs_run == 2
    tally.account(make_engine(settings.database_url or ""), [a, b])
    tally.tests["api_restarts"] = round(time.monotonic() - t_start, 1)


# ---------------------------------------------------------------------------------------- 3. a Ray worker
def committed_epoch(snapshot: Path) -> int:
    """The last epoch whose checkpoint Ray Train has registered (its run state in the storage path)."""
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):
        return 0
    latest = state.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("global_epoch") or 0)


def train_worker_pids() -> list[int]:
    """Process ids of the live Ray Train workers of this test session's Ray (from the GCS actor table;
    ``ray.util.state`` would need the dashboard, which the session's Ray does not start)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return [int(a["Pid"]) for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def test_a_killed_ray_train_worker_is_restarted_by_ray_train_and_resumes_without_spending_an_attempt(
        settings: Settings, worker: WorkerThread, tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    # a one-worker job on Ray Train's TorchTrainer (the warm path's actor kill is the soak's and the
    # expired-lease test's: docs/reliability.md)
    monkeypatch.setenv("RE_WARM_TRAIN", "0")  # the worker thread reads it per job
    t_start = time.monotonic()
    epochs = 3
    app = create_app(settings, warm=False)
    with TestClient(app) as client:
        r = client.post("/v1/jobs", json={"kind": "train", "spec": {**TRAIN, "epochs": epochs,
                                                                     "train_subset": 1536}})
        assert r.status_code == 201
        jid = r.json()["id"]
        snapshot = settings.ray_storage_path / jid / "checkpoint_manager_snapshot.json"
        poll(lambda: committed_epoch(snapshot), lambda e: e >= 1, 180, "first checkpoint committed")
        pids = train_worker_pids()
        assert len(pids) == 1, pids  # workers=1: one Ray Train worker process
        committed = committed_epoch(snapshot)
        os.kill(pids[0], signal.SIGKILL)
        tally.inject("ray_train_worker_killed")
        assert committed < epochs, "the run ended before the kill: nothing was tested"

        final = poll(lambda: job_of(client, jid), lambda j: j is not None and j["status"] in FINAL, 240,
                     "job finished")
        assert final["status"] == "succeeded", final
        # the group restart happened inside the attempt: no retry spent, no re-queue
        assert final["attempts"] == 1 and final["error"] is None
        assert events_of(client, jid) == ["created", "started", "succeeded"]
        logs = [x["line"] for x in client.get(f"/v1/jobs/{jid}/logs", params={"limit": 10000}).json()["items"]]
        resumed = [int(m.group(1)) for x in logs if (m := re.search(r"resuming at stage 1/1, epoch (\d+)/", x))]
        assert len(resumed) == 1 and resumed[0] >= committed + 1, (committed, resumed, logs)
        lines = epoch_lines(client, jid)
        assert sorted(set(lines)) == [(1, e) for e in range(1, epochs + 1)], lines
        redone = len(lines) - len(set(lines))  # whole epochs trained (and reported) twice
        assert redone <= 1
        history = client.get(f"/v1/jobs/{jid}/results").json()["results"]["history"]
        assert [h["global_epoch"] for h in history] == list(range(1, epochs + 1))
        assert not train_worker_pids()  # no worker of the run outlives it
        print(f"Ray Train worker killed after epoch {committed} was checkpointed; resumed at epoch {resumed[0]}; "
              f"whole epochs redone: {redone}")
        tally.redone("ray_train_worker_killed", redone)
        tally.account(make_engine(settings.database_url or ""), [jid])
    tally.tests["ray_worker_kill"] = round(time.monotonic() - t_start, 1)
