"""Every diversity method as a real train job: ``POST /v1/jobs`` → Postgres queue → worker → Ray Train → MNIST.

For each method the job is interrupted once (the worker shuts down after the first checkpointed epoch and
hands the job back to the queue), a second worker resumes it from that checkpoint, and the ``ensemble.pt``
downloaded over REST loads and scores the same clean accuracy as the job reported. DKD is interrupted after
its first member's stage has ended, so the resumed attempt must go on with the next member and never train
the main model again. (The expired-lease path, a worker killed without a word, is in test_service_e2e.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import migrate
from service.app import create_app
from service.settings import Settings
from workers.worker import Worker

pytestmark = pytest.mark.integration

BASE: dict[str, Any] = {"dataset": "mnist", "architecture": "lenet5", "members": 2, "batch_size": 64,
                        "train_subset": 2048, "eval_subset": 300, "workers": 1, "seed": 3}
# (extra spec, global epoch after which the worker is stopped, total global epochs)
CASES: dict[str, tuple[dict[str, Any], int, int]] = {
    "dkd": ({"epochs": 2}, 2, 4),  # stages M (epochs 1-2) and A1 (3-4): stop once M is finished
    "pdd": ({"epochs": 3}, 1, 3),
    "cce": ({"epochs": 3, "train_subset": 1024, "hyperparameters": {"steps": 3}}, 1, 3),
    "cldl": ({"epochs": 3}, 1, 3),
    "parl": ({"epochs": 3}, 1, 3),
}


@pytest.fixture()
def client_and_settings(pg_url: str, tmp_path_factory: pytest.TempPathFactory,
                        ray_session: None) -> Iterator[tuple[TestClient, Settings]]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path_factory.mktemp("methods-rest"), database_url=pg_url,
                        heartbeat_seconds=1.0, lease_seconds=30.0, retry_backoff_seconds=1.0, poll_seconds=1.0)
    with TestClient(create_app(settings, warm=False)) as client:
        yield client, settings


def _wait(client: TestClient, jid: str, cond: Any, timeout: float = 600.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.get(f"/v1/jobs/{jid}").json()
        if cond(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {jid}: expected state not reached in {timeout:.0f} s: "
                         f"{client.get(f'/v1/jobs/{jid}').json()}")


def _start_worker(settings: Settings) -> tuple[Worker, threading.Thread]:
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run, name="methods-worker", daemon=True)
    thread.start()
    return worker, thread


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_train_job_is_interrupted_resumed_and_its_ensemble_loads(
        method: str, client_and_settings: tuple[TestClient, Settings], tmp_path: Path) -> None:
    from ensemble_core.checkpoint import load_checkpoint, load_ensemble
    from ensemble_core.data import load_dataset, test_subset
    from ensemble_core.training import clean_accuracy

    client, settings = client_and_settings
    extra, stop_after, total = CASES[method]
    spec = {**BASE, "method": method, **extra}
    r = client.post("/v1/jobs", json={"kind": "train", "spec": spec})
    assert r.status_code == 201, r.text
    jid = r.json()["id"]

    # attempt 1: stop the worker (a graceful shutdown) once `stop_after` epochs are checkpointed
    worker, thread = _start_worker(settings)
    try:
        seen = _wait(client, jid, lambda j: (j["epoch"] or 0) >= stop_after or j["status"] not in ("queued", "running"))
    finally:
        worker.stop()
        thread.join(180)
    assert not thread.is_alive()
    assert seen["status"] == "running", seen
    released = client.get(f"/v1/jobs/{jid}").json()
    assert released["status"] == "queued", released
    committed = released["epoch"]
    assert stop_after <= committed < total, released

    # attempt 2: another worker resumes from the checkpoint and finishes
    worker, thread = _start_worker(settings)
    try:
        final = _wait(client, jid, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    finally:
        worker.stop()
        thread.join(180)
    assert final["status"] == "succeeded", final
    assert final["epoch"] == total and final["progress"] == 1.0

    loss = [p["step"] for p in client.get(f"/v1/jobs/{jid}/metrics", params={"name": "train_loss"}).json()["items"]]
    assert sorted(loss) == list(range(1, total + 1))
    # a released attempt is not counted, so the two attempts are told apart by the shutdown line
    lines = [x["line"] for x in client.get(f"/v1/jobs/{jid}/logs", params={"limit": 10000}).json()["items"]]
    cut = lines.index("worker shutting down: job returned to the queue (this attempt is not counted)")
    first, second = lines[:cut], lines[cut + 1:]
    assert not any(x.startswith("resuming at stage") for x in first), first
    assert sum(x.startswith("resuming at stage") for x in second) == 1, second
    # checkpointed epochs were not trained again (epoch lines read "stage S epoch E | ...")
    per_stage = total if method != "dkd" else total // 2
    done = {(1 + (g - 1) // per_stage, 1 + (g - 1) % per_stage) for g in range(1, committed + 1)}
    assert all(any(x.startswith(f"stage {s} epoch {e} |") for x in first) for s, e in done), first
    assert not any(x.startswith(f"stage {s} epoch {e} |") for s, e in done for x in second), second
    if method == "dkd":  # M (stage 1) had finished: the resumed attempt trains only A1
        assert any("resuming at stage 2/2, epoch" in x for x in second), second
        assert not any(x.startswith("stage 1 epoch") for x in second), second
    assert second[-1] == "succeeded"

    results = client.get(f"/v1/jobs/{jid}/results").json()
    assert results["checkpoint"] == "ensemble.pt"
    art = client.get(f"/v1/jobs/{jid}/artifacts/ensemble.pt")
    assert art.status_code == 200
    path = tmp_path / "ensemble.pt"
    path.write_bytes(art.content)
    state = load_checkpoint(path)
    assert state["progress"]["finished"] and json_method(state) == method
    ens = load_ensemble(path)
    assert len(ens) == 2
    acc = clean_accuracy(ens, test_subset(load_dataset("mnist", "test"), "report", n=300))["acc"]
    assert acc == pytest.approx(results["metrics"]["test_clean_acc"], abs=1e-9)
    assert acc > 0.5  # 2048 images, a few epochs: far above chance (0.1) for every method


def json_method(state: dict[str, Any]) -> str:
    import json

    return str(json.loads(state["spec"])["method"])
