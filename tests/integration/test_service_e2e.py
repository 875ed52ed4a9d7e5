"""The whole service on one machine: REST API + Postgres queue + worker + real local Ray + real MNIST.

Each Ray Train ``fit()`` costs 30 s or more here, so there are only three runs:

1. a 2-worker DDP train job from ``POST /v1/jobs`` to ``succeeded``, its checkpoint downloaded over
   REST and loaded, its metrics and logs read over REST (and an evaluate job that depends on it);
2. a running train job cancelled (it stops within seconds and ends ``cancelled``), and a queued
   job cancelled while it waits;
3. a worker process killed mid-run: its lease expires, the job goes back to the queue, and the next
   attempt (another worker) resumes from the last checkpoint instead of starting again at epoch 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import migrate
from service.app import create_app
from service.queue import Queue
from service.settings import Settings
from workers.worker import Worker

pytestmark = pytest.mark.integration

TRAIN: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3,
                         "epochs": 2, "batch_size": 64, "train_subset": 2048, "eval_subset": 500, "workers": 2,
                         "seed": 1}


class Stack:
    def __init__(self, client: TestClient, queue: Queue, settings: Settings) -> None:
        self.client, self.queue, self.settings = client, queue, settings
        self.worker: Worker | None = None
        self.thread: threading.Thread | None = None

    def start_worker(self) -> Worker:
        self.worker = Worker(self.settings)
        self.thread = threading.Thread(target=self.worker.run, name="test-worker", daemon=True)
        self.thread.start()
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None and self.thread is not None:
            self.worker.stop()
            self.thread.join(120)

    def submit(self, kind: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
        r = self.client.post("/v1/jobs", json={"kind": kind, "spec": spec, **extra})
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, cond: Any, timeout: float = 600.0) -> dict[str, Any]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            job = self.job(job_id)
            if cond(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not reach the expected state in {timeout:.0f} s: {self.job(job_id)}")

    def wait_done(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout)

    def metrics(self, job_id: str, name: str) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": name}).json()["items"]

    def log_lines(self, job_id: str) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 10000}).json()["items"]


@pytest.fixture()
def stack(pg_url: str, tmp_path: Path, ray_session: None) -> Iterator[Stack]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, heartbeat_seconds=1.0, lease_seconds=30.0,
                        retry_backoff_seconds=1.0, poll_seconds=2.0)
    app = create_app(settings, warm=False)
    with TestClient(app) as client:
        s = Stack(client, app.state.queue, settings)
        try:
            yield s
        finally:
            s.stop_worker()


def test_train_job_with_two_ddp_workers_from_post_to_a_downloaded_checkpoint(stack: Stack, tmp_path: Path) -> None:
    from ensemble_core.checkpoint import load_checkpoint, load_ensemble
    from ensemble_core.data import load_dataset, test_subset
    from ensemble_core.training import clean_accuracy

    stack.start_worker()
    t0 = time.monotonic()
    job = stack.submit("train", TRAIN)
    jid = job["id"]
    seen_running = stack.wait(jid, lambda j: j["status"] != "queued", 120)
    assert seen_running["status"] in ("running", "succeeded") and seen_running["attempts"] == 1
    final = stack.wait_done(jid)
    print(f"train job (3 x lenet5, 2 DDP workers, 2 epochs of 2048 MNIST images): {time.monotonic() - t0:.1f} s")
    assert final["status"] == "succeeded", final
    assert final["progress"] == 1.0 and final["epoch"] == 2 and final["total_epochs"] == 2
    assert final["attempts"] == 1 and final["error"] is None and final["finished_at"]

    # metrics: one point per epoch, from the rank-0 report of the DDP run
    loss = stack.metrics(jid, "train_loss")
    assert [p["step"] for p in loss] == [1, 2] and loss[1]["value"] < loss[0]["value"]
    assert [p["step"] for p in stack.metrics(jid, "sel_clean_acc")] == [1, 2]
    # logs: the worker's lines and the run's (rank 0) lines
    lines = [x["line"] for x in stack.log_lines(jid)]
    assert lines[0].startswith("attempt 1/3 of train job started")
    # the default path for DDP jobs: a warm DDP group (workers/warm_ddp.py), new in this worker's process
    assert any("starting on a warm DDP group of 2 workers (new" in x for x in lines), lines
    assert any("stage 1 epoch 2" in x for x in lines)
    assert lines[-1] == "succeeded"

    results = stack.client.get(f"/v1/jobs/{jid}/results").json()
    assert results["checkpoint"] == "ensemble.pt" and 0.8 < results["metrics"]["test_clean_acc"] <= 1.0

    names = {a["name"] for a in stack.client.get(f"/v1/jobs/{jid}/artifacts").json()["items"]}
    assert {"ensemble.pt", "results.json"} <= names
    r = stack.client.get(f"/v1/jobs/{jid}/artifacts/ensemble.pt")
    assert r.status_code == 200
    path = tmp_path / "downloaded.pt"
    path.write_bytes(r.content)
    state = load_checkpoint(path)
    assert state["progress"]["finished"]
    ens = load_ensemble(path)
    assert len(ens) == 3
    # the downloaded file is the evaluated ensemble: same accuracy on the same PROTOCOL subset
    acc = clean_accuracy(ens, test_subset(load_dataset("mnist", "test"), "report", n=500))["acc"]
    assert acc == pytest.approx(results["metrics"]["test_clean_acc"], abs=1e-9)

    events = [e["event"] for e in stack.client.get(f"/v1/jobs/{jid}/events").json()]
    assert events == ["created", "started", "succeeded"]

    if Path(__file__).resolve().parents[2].joinpath("workers", "ray_eval.py").exists():
        ev = stack.submit("evaluate", {"target_job": jid, "n_examples": 100, "member_transfer": None,
                                       "attacks": [{"name": "pgd", "eps": [0.1, 0.3], "steps": 10}]})
        assert ev["depends_on"] == [jid]
        done = stack.wait_done(ev["id"])
        assert done["status"] == "succeeded", done
        out = stack.client.get(f"/v1/jobs/{ev['id']}/results").json()
        assert out["tables"] and stack.client.get(f"/v1/jobs/{ev['id']}/artifacts").json()["items"]


def test_cancel_a_running_and_a_queued_train_job(stack: Stack) -> None:
    stack.start_worker()
    long_job = stack.submit("train", {**TRAIN, "epochs": 50, "train_subset": 4096})
    waiting = stack.submit("train", {**TRAIN, "seed": 2})
    jid = long_job["id"]
    # cancel the queued one while the worker is busy with the first
    stack.wait(jid, lambda j: j["status"] == "running", 120)
    r = stack.client.post(f"/v1/jobs/{waiting['id']}/cancel").json()
    assert r["status"] == "cancelled"
    # let the run reach its first epoch, then cancel it
    stack.wait(jid, lambda j: (j["epoch"] or 0) >= 1, 300)
    t0 = time.monotonic()
    assert stack.client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    final = stack.wait_done(jid, 120)
    latency = time.monotonic() - t0
    print(f"running train job cancelled {latency:.1f} s after POST /cancel")
    assert final["status"] == "cancelled" and final["epoch"] < 50
    assert latency < 45
    assert [e["event"] for e in stack.client.get(f"/v1/jobs/{jid}/events").json()] == [
        "created", "started", "cancel_requested", "cancelled"]
    assert stack.job(waiting["id"])["status"] == "cancelled" and stack.job(waiting["id"])["attempts"] == 0
    assert "cancel requested: stopping" in [x["line"] for x in stack.log_lines(jid)]


def _committed_epoch(snapshot: Path) -> int:
    """The last epoch whose checkpoint Ray Train has registered (its run state in the storage path); on the warm
    path (``snapshot`` is the run's ``warm/`` folder) the newest epoch state written (workers/warm.py)."""
    if snapshot.name == "warm":
        return max((int(p.stem.split("-")[1]) for p in snapshot.glob("epoch-*.pt")), default=0)
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):
        return 0
    latest = state.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("global_epoch") or 0)


@pytest.mark.parametrize("path", ["ray_train", "warm", "warm_ddp"])
def test_an_expired_lease_requeues_the_job_and_the_next_attempt_resumes_from_the_checkpoint(
        stack: Stack, pg_url: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three paths: Ray Train's ``fit()`` per job (2 DDP workers, RE_WARM_DDP=0), one worker on a warm actor, and
    2 DDP workers on a warm DDP group (the defaults). The actor and the group are owned by worker A's process and
    die with it, so neither can train beside worker B's attempt."""
    import ray

    warm = path != "ray_train"
    # worker A inherits them; worker B reads them here
    monkeypatch.setenv("RE_WARM_TRAIN", "1" if path == "warm" else "0")
    monkeypatch.setenv("RE_WARM_DDP", "1" if path == "warm_ddp" else "0")
    # max_attempts 1: the worker's death is an infrastructure failure and must not spend the only attempt
    job = stack.submit("train", {**TRAIN, "epochs": 3, **({"workers": 1} if path == "warm" else {})},
                       max_attempts=1)
    jid = job["id"]
    # worker A: a separate process on the same Ray cluster and data directory, with a short lease
    env = {**os.environ, "RE_HEARTBEAT_SECONDS": "1", "RE_RETRY_BACKOFF_SECONDS": "1"}
    cmd = [sys.executable, "-m", "workers.main", "worker", "--address", ray.get_runtime_context().gcs_address,
           "--database-url", pg_url, "--data-dir", str(stack.settings.data_dir), "--lease-seconds", "4",
           "--max-jobs", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = stack.settings.ray_storage_path / jid / ("warm" if warm else "checkpoint_manager_snapshot.json")
    try:
        # kill A once a checkpoint of at least one epoch is committed and that epoch is reported (the warm path
        # writes an epoch's state just before it reports the epoch: killed in between, the epoch's metric points
        # would never be stored, a gap this test is not about)
        stack.wait(jid, lambda j: (j["epoch"] or 0) >= 1 and _committed_epoch(snapshot) >= 1, 400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker dies without a word: no release, no final state
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    killed_at = stack.job(jid)
    assert killed_at["status"] == "running" and killed_at["attempts"] == 1, out[-3000:]
    committed = _committed_epoch(snapshot)
    assert 1 <= committed < 3

    # worker B (this process) sweeps the expired lease and takes the job: attempt 2 resumes the Ray run
    stack.start_worker()
    final = stack.wait_done(jid)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2 and final["infra_failures"] == 1  # the worker's death spent no retry
    events = stack.client.get(f"/v1/jobs/{jid}/events").json()
    assert [e["event"] for e in events] == ["created", "started", "requeued", "started", "succeeded"]
    assert "lease expired" in events[2]["detail"]
    assert events[1]["worker"] != events[3]["worker"]

    loss = {p["step"]: p for p in stack.metrics(jid, "train_loss")}
    assert sorted(loss) == [1, 2, 3]
    # epochs A had checkpointed were not trained again by B: their points still carry attempt 1
    assert [loss[s]["attempt"] for s in range(1, committed + 1)] == [1] * committed
    assert loss[3]["attempt"] == 2
    lines = stack.log_lines(jid)
    second = [x["line"] for x in lines if x["attempt"] == 2]
    assert any(f"resuming at stage 1/1, epoch {committed + 1}/3" in x for x in second), second
    assert not any("stage 1 epoch 1 " in x for x in second)
    assert any("warm trainer on host" in x for x in second) == (path == "warm")
    assert any("on a warm DDP group of 2 workers (new" in x for x in second) == (path == "warm_ddp")
