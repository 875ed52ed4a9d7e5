"""The Postgres job queue and the worker loop, against a real PostgreSQL.

The worker-loop tests give the worker plain Python job functions in place of the Ray runners (the
runner is the worker's plug-in point); what they exercise - leases, heartbeats, cancel, failure
classification, retries, hand-back on shutdown - is the real worker code on the real database.
The Ray runners themselves are exercised end to end in ``test_service_e2e.py``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from service import migrate
from service.db import libpq_url, make_engine
from service.queue import IdempotencyConflict, Queue
from service.settings import Settings
from workers.errors import InfrastructureError, JobCancelled, UserError
from workers.worker import JobRun, Worker

pytestmark = pytest.mark.integration


@pytest.fixture()
def engine(pg_url: str) -> Iterator[Engine]:
    migrate.upgrade(pg_url)
    eng = make_engine(pg_url, pool_size=12, max_overflow=4)
    yield eng
    eng.dispose()


def _status(engine: Engine, job_id: uuid.UUID) -> dict[str, Any]:
    with engine.connect() as c:
        return dict(c.execute(text("SELECT status, attempts, error, run_after > now() AS backing_off, "
                                   "lease_expires_at FROM jobs WHERE id = :id"), {"id": job_id}).one()._mapping)


def _events(engine: Engine, job_id: uuid.UUID) -> list[str]:
    with engine.connect() as c:
        return list(c.execute(text("SELECT event FROM job_events WHERE job_id = :id ORDER BY id"),
                              {"id": job_id}).scalars())


# ------------------------------------------------------------------------------------------ claims
def test_concurrent_claimers_never_get_the_same_job(engine: Engine) -> None:
    n_jobs, n_claimers = 200, 8
    q = Queue(engine)
    for i in range(n_jobs):
        q.submit("train", {"i": i}, priority=i % 3)
    claimed: list[list[uuid.UUID]] = [[] for _ in range(n_claimers)]
    start = threading.Barrier(n_claimers)

    def claimer(k: int) -> None:
        mine = Queue(engine)
        start.wait()
        while (lease := mine.claim(f"claimer-{k}")) is not None:
            claimed[k].append(lease.job_id)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(n_claimers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    all_ids = [j for ids in claimed for j in ids]
    print(f"{n_claimers} claimers took {n_jobs} jobs in {seconds:.2f} s ({n_jobs / seconds:.0f} claims/s); "
          f"per claimer {sorted(len(c) for c in claimed)}")
    assert len(all_ids) == n_jobs and len(set(all_ids)) == n_jobs
    assert sum(1 for c in claimed if c) > 1  # the work really was shared
    with engine.connect() as c:
        row = c.execute(text("SELECT count(*) FILTER (WHERE status = 'running' AND attempts = 1), "
                             "count(DISTINCT lease_owner) FROM jobs")).one()
        started = c.execute(text("SELECT count(*) FROM job_events WHERE event = 'started'")).scalar_one()
    assert row[0] == n_jobs and started == n_jobs  # one transition per job, each recorded


def test_claim_order_is_priority_then_submission(engine: Engine) -> None:
    q = Queue(engine)
    low, _ = q.submit("train", {"n": 1}, priority=0)
    high, _ = q.submit("train", {"n": 2}, priority=5)
    low2, _ = q.submit("train", {"n": 3}, priority=0)
    order = [q.claim("w").job_id for _ in range(3)]  # type: ignore[union-attr]
    assert order == [high["id"], low["id"], low2["id"]]
    assert q.claim("w") is None


# ------------------------------------------------------------------------------------------ leases
def test_an_expired_lease_returns_the_job_to_the_queue_with_backoff_and_fences_the_old_holder(
        engine: Engine) -> None:
    q = Queue(engine, lease_seconds=0.5, backoff_base=1.5)
    job, _ = q.submit("train", {"x": 1})
    old = q.claim("worker-a")
    assert old is not None and old.attempt == 1
    assert q.heartbeat(old).ok
    time.sleep(0.8)  # no heartbeat: the lease runs out
    assert q.sweep_expired() == [(job["id"], "queued")]
    st = _status(engine, job["id"])
    assert st["status"] == "queued" and st["attempts"] == 1 and st["backing_off"]
    assert st["error"] == ("lease expired: worker worker-a stopped heartbeating during attempt 1 (infrastructure "
                           "failure 1 of at most 10, not charged to the job's 3 attempts; retried after a backoff)")
    assert q.claim("worker-b") is None  # backoff: not before run_after
    # the old holder has lost the job: its heartbeat says so and its writes are refused
    assert not q.heartbeat(old).ok
    assert not q.succeed(old, {"late": True})
    assert not q.set_progress(old, 0.5)
    time.sleep(1.6)
    new = q.claim("worker-b")
    assert new is not None and new.job_id == job["id"] and new.attempt == 2
    assert not q.heartbeat(old).ok and q.heartbeat(new).ok
    assert q.succeed(new, {"ok": True})
    assert _events(engine, job["id"]) == ["created", "started", "requeued", "started", "succeeded"]


def test_expiry_is_not_charged_to_max_attempts_but_is_capped_and_a_cancelling_job_ends_cancelled(
        engine: Engine) -> None:
    q = Queue(engine, lease_seconds=0.3, backoff_base=0.0, max_infra_failures=2)
    last, _ = q.submit("train", {"a": 1}, max_attempts=1)
    lease = q.claim("w")
    assert lease is not None
    doomed, _ = q.submit("train", {"b": 1})
    lease2 = q.claim("w")
    assert lease2 is not None
    q.cancel(doomed["id"])
    time.sleep(0.5)
    assert sorted(s for _, s in q.sweep_expired()) == ["cancelled", "queued"]  # max_attempts=1 is not spent
    assert _status(engine, doomed["id"])["status"] == "cancelled"
    again = q.claim("w")
    assert again is not None and again.job_id == last["id"] and again.attempt == 2
    time.sleep(0.5)
    assert q.sweep_expired() == [(last["id"], "failed")]  # the second infrastructure failure reaches the cap
    st = _status(engine, last["id"])
    assert st["attempts"] == 2 and st["error"] == ("lease expired: worker w stopped heartbeating during attempt 2 "
                                                   "(infrastructure failure 2 of at most 2; none left)")
    assert q.get(last["id"])["infra_failures"] == 2


def test_infrastructure_failures_and_job_failures_have_separate_budgets_and_backoffs(engine: Engine) -> None:
    q = Queue(engine, backoff_base=0.0, max_infra_failures=3)
    job, _ = q.submit("train", {"a": 1}, max_attempts=1)
    for n in (1, 2):  # two infrastructure failures: the single charged attempt stays unspent
        lease = q.claim("w")
        assert lease is not None and lease.attempt == n
        assert q.retry_infra(lease, "InfrastructureError: Ray node lost") == "queued"
        j = q.get(job["id"])
        assert (j["attempts"], j["infra_failures"]) == (n, n)
        assert j["error"] == (f"InfrastructureError: Ray node lost (infrastructure failure {n} of at most 3, not "
                              "charged to the job's 1 attempts; retried after a backoff)")
    lease = q.claim("w")
    assert lease is not None and lease.attempt == 3
    assert q.retry_later(lease, "ZeroDivisionError: division by zero") == "failed"  # its own error: charged
    assert q.get(job["id"])["error"] == "ZeroDivisionError: division by zero (attempt 1 of 1; no attempts left)"
    # each class backs off by its own count: the first infrastructure failure waits base * 2^0
    q2 = Queue(engine, backoff_base=100.0)
    j2, _ = q2.submit("train", {"b": 1})
    lease = q2.claim("w")
    assert lease is not None
    q2.retry_infra(lease, "InfrastructureError: x")
    with engine.connect() as c:
        delay = c.execute(text("SELECT extract(epoch FROM run_after - now()) FROM jobs WHERE id = :id"),
                          {"id": j2["id"]}).scalar_one()
    assert 95 < float(delay) <= 100
    with pytest.raises(ValueError, match="max_infra_failures"):
        Queue(engine, max_infra_failures=0)


def test_retries_back_off_and_stop_at_max_attempts(engine: Engine) -> None:
    q = Queue(engine, backoff_base=0.0)
    job, _ = q.submit("train", {"a": 1}, max_attempts=2)
    lease = q.claim("w")
    assert q.retry_later(lease, "RuntimeError: flaky") == "queued"  # type: ignore[arg-type]
    lease = q.claim("w")
    assert lease is not None and lease.attempt == 2
    assert q.retry_later(lease, "RuntimeError: flaky again") == "failed"
    st = _status(engine, job["id"])
    assert st["status"] == "failed" and st["error"] == ("RuntimeError: flaky again (attempt 2 of 2; no attempts "
                                                        "left)")
    # the backoff doubles per attempt (base * 2^(attempts-1))
    q2 = Queue(engine, backoff_base=100.0)
    j2, _ = q2.submit("train", {"b": 1})
    lease = q2.claim("w")
    q2.retry_later(lease, "x")  # type: ignore[arg-type]
    with engine.connect() as c:
        delay = c.execute(text("SELECT extract(epoch FROM run_after - now()) FROM jobs WHERE id = :id"),
                          {"id": j2["id"]}).scalar_one()
    assert 95 < float(delay) <= 100


def test_a_failed_dependency_fails_its_dependents_with_the_reason(engine: Engine) -> None:
    q = Queue(engine)
    train, _ = q.submit("train", {"t": 1})
    ev, _ = q.submit("evaluate", {"e": 1}, depends_on=[train["id"]])
    ev2, _ = q.submit("evaluate", {"e": 2}, depends_on=[ev["id"]])  # a chain fails all the way
    lease = q.claim("w")
    assert lease is not None and lease.job_id == train["id"]
    assert q.claim("w") is None  # the evaluation waits
    q.fail(lease, "UserError: dataset not found")
    st = _status(engine, ev["id"])
    assert st["status"] == "failed"
    assert st["error"] == f"dependency {train['id']} (train) ended failed: UserError: dataset not found"
    assert _status(engine, ev2["id"])["status"] == "failed"


def test_idempotent_submission_under_concurrency(engine: Engine) -> None:
    q = Queue(engine)
    ids: list[uuid.UUID] = []
    lock = threading.Lock()

    def submit() -> None:
        job, _ = Queue(engine).submit("train", {"s": 1}, idempotency_key="same")
        with lock:
            ids.append(job["id"])

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    with pytest.raises(IdempotencyConflict):
        q.submit("train", {"s": 2}, idempotency_key="same")
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1


def test_submissions_notify_listeners(engine: Engine, pg_url: str) -> None:
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        conn.execute("LISTEN re_jobs")
        Queue(engine).submit("evaluate", {"x": 1})
        got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == ["evaluate:queued"]


# ------------------------------------------------------------------------------------------ the worker loop
def _worker(pg_url: str, tmp: Path, runners: dict[str, Any], **kw: Any) -> Worker:
    settings = Settings(data_dir=tmp, database_url=pg_url, heartbeat_seconds=kw.pop("heartbeat", 0.2),
                        lease_seconds=kw.pop("lease", 5.0), poll_seconds=kw.pop("poll", 30.0),
                        retry_backoff_seconds=0.0)
    return Worker(settings, runners=runners, **kw)


def _run_in_thread(worker: Worker, **kw: Any) -> threading.Thread:
    t = threading.Thread(target=worker.run, kwargs=kw, daemon=True)
    t.start()
    return t


def _wait(cond: Any, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_worker_runs_a_job_recording_metrics_logs_progress_and_result(engine: Engine, pg_url: str,
                                                                      tmp_path: Path) -> None:
    def train(run: JobRun) -> dict[str, Any]:
        for epoch in (1, 2):
            run.on_epoch({"global_epoch": epoch, "total_epochs": 2, "stage": 0, "stage_name": "all",
                          "train_loss": 1.0 / epoch})
            run.log(f"epoch {epoch} done")
        (run.artifacts_dir / "ensemble.pt").write_bytes(b"w")
        return {"metrics": {"test_clean_acc": 0.9}}

    q = Queue(engine)
    job, _ = q.submit("train", {"a": 1})
    w = _worker(pg_url, tmp_path, {"train": train})
    t = _run_in_thread(w, max_jobs=1)
    t.join(30)
    assert not t.is_alive()
    st = q.get(job["id"])
    assert st["status"] == "succeeded" and st["progress"] == 1.0 and st["epoch"] == 2 and st["stage"] == "all"
    assert q.result(job["id"]) == {"metrics": {"test_clean_acc": 0.9}}
    assert [(m["name"], m["step"], m["value"]) for m in q.metrics(job["id"], "train_loss")] == [
        ("train_loss", 1, 1.0), ("train_loss", 2, 0.5)]
    assert {m["name"] for m in q.metrics(job["id"])} == {"train_loss"}  # epoch coordinates are not metrics
    lines = [x["line"] for x in q.logs(job["id"])]
    assert lines[0].startswith("attempt 1/3 of train job started on worker")
    assert lines[1:] == ["epoch 1 done", "epoch 2 done", "succeeded"]
    assert (tmp_path / "artifacts" / str(job["id"]) / "ensemble.pt").read_bytes() == b"w"


def test_worker_classifies_failures(engine: Engine, pg_url: str, tmp_path: Path) -> None:
    calls: dict[str, int] = {}

    def flaky(run: JobRun) -> dict[str, Any]:
        n = calls[run.job_id] = calls.get(run.job_id, 0) + 1
        spec = run.lease.spec
        if spec["mode"] == "user":
            raise UserError("members: baseline needs at least 1 member")
        if spec["mode"] == "infra" and n == 1:
            raise InfrastructureError("Ray node lost")
        if spec["mode"] == "bug":
            raise ZeroDivisionError("division by zero")
        return {"attempt": run.lease.attempt}

    q = Queue(engine)
    user, _ = q.submit("train", {"mode": "user"})
    infra, _ = q.submit("train", {"mode": "infra"}, max_attempts=1)  # the infrastructure failure is not charged
    bug, _ = q.submit("train", {"mode": "bug"}, max_attempts=2)
    w = _worker(pg_url, tmp_path, {"train": flaky})
    for _ in range(5):
        w.run_once()
    assert q.get(user["id"])["status"] == "failed" and calls[str(user["id"])] == 1  # never retried
    assert q.get(user["id"])["error"] == "members: baseline needs at least 1 member"
    assert q.get(infra["id"])["status"] == "succeeded" and q.result(infra["id"]) == {"attempt": 2}
    assert q.get(infra["id"])["infra_failures"] == 1
    b = q.get(bug["id"])
    assert b["status"] == "failed" and b["attempts"] == 2 and calls[str(bug["id"])] == 2
    assert b["error"].startswith("ZeroDivisionError: division by zero (attempt 2 of 2")
    assert any("ZeroDivisionError" in x["line"] for x in q.logs(bug["id"]))  # the traceback is in the logs


def _stoppable(started: threading.Event) -> Any:
    def runner(run: JobRun) -> dict[str, Any]:
        started.set()
        while not run.should_stop():
            time.sleep(0.05)
        raise JobCancelled("stopped")

    return runner


def test_cancel_of_a_running_job_stops_it_within_seconds(engine: Engine, pg_url: str, tmp_path: Path) -> None:
    started = threading.Event()
    q = Queue(engine)
    job, _ = q.submit("train", {"a": 1})
    w = _worker(pg_url, tmp_path, {"train": _stoppable(started)}, heartbeat=0.5)
    t = _run_in_thread(w, max_jobs=1)
    assert started.wait(20)
    assert q.cancel(job["id"])["status"] == "cancelling"
    latency = _wait(lambda: q.get(job["id"])["status"] == "cancelled")
    print(f"running job cancelled {latency:.2f} s after the request (heartbeat 0.5 s)")
    assert latency < 3
    t.join(10)
    assert _events(engine, job["id"]) == ["created", "started", "cancel_requested", "cancelled"]


def test_a_stopping_worker_hands_its_job_back_without_counting_the_attempt(engine: Engine, pg_url: str,
                                                                            tmp_path: Path) -> None:
    started = threading.Event()
    q = Queue(engine)
    job, _ = q.submit("train", {"a": 1})
    w = _worker(pg_url, tmp_path, {"train": _stoppable(started)})
    t = _run_in_thread(w)
    assert started.wait(20)
    w.stop()
    t.join(10)
    assert not t.is_alive()
    st = q.get(job["id"])
    assert st["status"] == "queued" and st["attempts"] == 0 and "worker shut down" in st["error"]
    lease = q.claim("next")
    assert lease is not None and lease.attempt == 1


def test_a_worker_that_loses_its_lease_stops_and_leaves_the_job_alone(engine: Engine, pg_url: str,
                                                                      tmp_path: Path) -> None:
    started = threading.Event()
    q = Queue(engine)
    job, _ = q.submit("train", {"a": 1})
    w = _worker(pg_url, tmp_path, {"train": _stoppable(started)}, lease=60.0)
    t = _run_in_thread(w, max_jobs=1)
    assert started.wait(20)
    # another party decides the lease is gone (as a sweeper would after a network partition)
    with engine.begin() as c:
        c.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                  {"id": job["id"]})
    assert q.sweep_expired() == [(job["id"], "queued")]
    t.join(10)
    assert not t.is_alive()
    st = q.get(job["id"])
    assert st["status"] == "queued" and st["attempts"] == 1  # untouched by the old worker


def test_idle_worker_wakes_on_notify_not_on_the_poll_interval(engine: Engine, pg_url: str, tmp_path: Path) -> None:
    done = threading.Event()

    def quick(run: JobRun) -> dict[str, Any]:
        done.set()
        return {}

    w = _worker(pg_url, tmp_path, {"evaluate": quick}, poll=60.0)
    t = _run_in_thread(w, max_jobs=1)
    time.sleep(1.5)  # the worker found nothing and is waiting (LISTEN, poll interval 60 s)
    t0 = time.monotonic()
    Queue(engine).submit("evaluate", {"x": 1})
    assert done.wait(10)
    latency = time.monotonic() - t0
    print(f"idle worker picked up a new job {latency:.2f} s after submission")
    assert latency < 3
    t.join(10)


def test_a_job_with_an_unknown_kind_for_this_worker_is_left_queued(engine: Engine, pg_url: str,
                                                                  tmp_path: Path) -> None:
    q = Queue(engine)
    job, _ = q.submit("tune", {"x": 1})
    w = _worker(pg_url, tmp_path, {"train": lambda run: {}})
    assert w.run_once() is False
    assert q.get(job["id"])["status"] == "queued"


def test_a_finished_train_job_stores_the_epochs_an_earlier_attempt_checkpointed_but_never_reported(
        engine: Engine, pg_url: str, tmp_path: Path) -> None:
    """Epoch 1 was checkpointed by an attempt that died before reporting it: the resumed attempt starts at epoch 2,
    and epoch 1's metrics exist only in the run's history; they are stored at the end, and reported points are
    kept as they are."""
    history = [{"global_epoch": e, "total_epochs": 3, "stage": 0, "train_loss": 1.0 / e} for e in (1, 2, 3)]

    def resumed(run: JobRun) -> dict[str, Any]:
        for row in history[1:]:
            run.on_epoch({**row, "train_loss": row["train_loss"] + 10})  # what was reported live
        return {"metrics": {}, "results": {"history": history}}

    q = Queue(engine)
    job, _ = q.submit("train", {"a": 2})
    w = _worker(pg_url, tmp_path, {"train": resumed})
    assert w.run_once()
    assert q.get(job["id"])["status"] == "succeeded"
    assert [(m["step"], m["value"]) for m in q.metrics(job["id"], "train_loss")] == [
        (1, 1.0), (2, 10.5), (3, 10 + 1 / 3)]  # epoch 1 from the history; epochs 2 and 3 as reported
    assert any(x["line"].startswith("stored the metrics of epoch(s) 1 from the run's history (not reported")
               for x in q.logs(job["id"]))
    # nothing missing: nothing stored, no log line
    job2, _ = q.submit("train", {"a": 3})
    w2 = _worker(pg_url, tmp_path, {"train": lambda run: [run.on_epoch(r) for r in history] and
                                    {"metrics": {}, "results": {"history": history}}})
    assert w2.run_once()
    assert [m["value"] for m in q.metrics(job2["id"], "train_loss")] == [1.0, 0.5, 1 / 3]
    assert not any("from the run's history" in x["line"] for x in q.logs(job2["id"]))
