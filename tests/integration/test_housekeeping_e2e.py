"""The workers' housekeeping thread end to end: a real :class:`Worker` (its housekeeping thread on), real Ray
Train runs, real PostgreSQL, the API in-process and a webhook receiver on 127.0.0.1.

One worker runs a low-priority 6-epoch train job; a high-priority job arrives and waits. The housekeeping thread
(``preempt_after_seconds`` = 2) asks the run to stop at its next epoch checkpoint; the job goes back to the queue
(``preempted``, its attempt not charged), the worker takes the waiting job, then resumes the first one from its
checkpoint. The same thread delivers the owner's webhook events, signed, for both jobs (``docs/webhooks.md``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from webhook_receiver import Receiver

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.settings import Settings
from service.webhooks import verify
from workers.worker import Worker

pytestmark = pytest.mark.integration

TRAIN: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 2,
                         "epochs": 6, "batch_size": 64, "train_subset": 2048, "eval_subset": 200, "workers": 1,
                         "seed": 11}
EPOCH_LINE = re.compile(r"^stage (\d+) epoch (\d+) ")


def wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.5)


def ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


def test_a_waiting_job_preempts_a_lower_priority_run_at_its_checkpoint_and_hooks_report_both(
        ray_session: None, pg_url: str, tmp_path: Path) -> None:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, housekeeping=True,
                        preempt_after_seconds=2.0, heartbeat_seconds=1.0, poll_seconds=1.0,
                        retry_backoff_seconds=1.0, webhook_allow_private=True, webhook_backoff_seconds=0.2,
                        webhook_backoff_max_seconds=1.0)
    app = create_app(settings, warm=False)
    token, _ = TokenStore(app.state.queue.engine).create("alice")
    h = {"Authorization": f"Bearer {token}"}
    with Receiver() as rx, TestClient(app) as client:
        hook = client.post("/v1/webhooks", headers=h, json={
            "url": rx.url + "/hook", "events": ["job.started", "job.preempted", "job.succeeded"]})
        assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]

        def job(jid: str) -> dict[str, Any]:
            return dict(client.get(f"/v1/jobs/{jid}", headers=h).json())

        def lines(jid: str) -> list[dict[str, Any]]:
            return list(client.get(f"/v1/jobs/{jid}/logs", headers=h, params={"limit": 10000}).json()["items"])

        low = client.post("/v1/jobs", headers=h, json={"kind": "train", "spec": TRAIN, "priority": 0}).json()["id"]
        worker = Worker(settings)
        thread = threading.Thread(target=worker.run, name="housekeeping-e2e-worker", daemon=True)
        thread.start()
        try:
            # the waiting job arrives as soon as the run has started: its preemption request (after 2 s of waiting)
            # then reaches the run well before its last epoch, however fast the epochs or the log shipping are
            wait("the low-priority job starts", lambda: job(low)["status"] == "running", 300)
            high = client.post("/v1/jobs", headers=h, json={"kind": "train", "spec": {**TRAIN, "epochs": 1},
                                                             "priority": 10}).json()["id"]
            wait("both jobs succeed", lambda: job(low)["status"] == job(high)["status"] == "succeeded", 600)
            # the housekeeping thread delivered the hook's events for both jobs, signed (before the worker stops)
            def delivered() -> list[dict[str, Any]]:
                got = [r["json"] for r in rx.requests if r["json"]]
                want = {(low, "job.succeeded"), (high, "job.succeeded"), (low, "job.preempted")}
                seen = {(g["job"]["id"], g["event"]) for g in got}
                return got if want <= seen else []

            wait("the webhook deliveries", delivered, 60)
            assert worker.housekeeper is not None
            housekeeping_errors = worker.housekeeper.errors
        finally:
            worker.stop()
            thread.join(120)

        lo, hi = job(low), job(high)
        assert lo["preemptions"] == 1 and hi["preemptions"] == 0
        events = client.get(f"/v1/jobs/{low}/events", headers=h).json()
        names = [e["event"] for e in events]
        assert names[:2] == ["created", "started"] and names[-1] == "succeeded", names
        assert "preempted" in names and names.count("started") == 2, names
        # the waiting job ran between the preemption and the resumption
        preempted_at = next(ts(e) for e in events if e["event"] == "preempted")
        resumed_at = [ts(e) for e in events if e["event"] == "started"][1]
        hi_events = client.get(f"/v1/jobs/{high}/events", headers=h).json()
        hi_started = next(ts(e) for e in hi_events if e["event"] == "started")
        hi_done = next(ts(e) for e in hi_events if e["event"] == "succeeded")
        assert preempted_at <= hi_started and hi_done <= resumed_at
        # the preempted run stopped at an epoch checkpoint and the next run resumed after it: no epoch twice
        text = [x["line"] for x in lines(low)]
        epochs = [(int(m.group(1)), int(m.group(2))) for x in text if (m := EPOCH_LINE.match(x))]
        assert sorted(epochs) == [(1, e) for e in range(1, 7)], epochs
        assert any("preemption requested by a job of higher priority" in x for x in text), text
        resumed = [int(m.group(1)) for x in text if (m := re.search(r"resuming at stage 1/1, epoch (\d+)/6", x))]
        assert len(resumed) == 1 and 2 <= resumed[0] <= 6, (resumed, text)

        for req in rx.requests:
            hd = {k.lower(): v for k, v in req["headers"].items()}
            assert verify(secret, hd["x-re-timestamp"], req["body"], hd["x-re-signature"])
        assert housekeeping_errors == 0
