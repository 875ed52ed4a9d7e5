"""Acceptance over REST: an evaluate job comparing two train jobs (a method vs the baseline) returns the
tables and the plot. Real API, real Postgres queue, real worker with Ray Train and real MNIST."""

from __future__ import annotations

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

TRAIN: dict[str, Any] = {"dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": 1,
                         "batch_size": 64, "train_subset": 3000, "eval_subset": 200, "workers": 1, "seed": 0}


class Client:
    def __init__(self, client: TestClient) -> None:
        self.client = client

    def submit(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/v1/jobs", json={"kind": kind, "spec": spec})
        assert r.status_code == 201, r.text
        return r.json()

    def wait_done(self, job_id: str, timeout: float = 1200.0) -> dict[str, Any]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s")


@pytest.fixture()
def stack(pg_url: str, tmp_path: Path, ray_session: None) -> Iterator[Client]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, heartbeat_seconds=1.0, lease_seconds=60.0,
                        retry_backoff_seconds=1.0, poll_seconds=1.0)
    app = create_app(settings, warm=False)
    worker = Worker(settings)
    import threading

    thread = threading.Thread(target=worker.run, name="eval-test-worker", daemon=True)
    with TestClient(app) as client:
        thread.start()
        try:
            yield Client(client)
        finally:
            worker.stop()
            thread.join(300)


def test_evaluate_job_compares_a_method_with_the_baseline(stack: Client) -> None:
    base = stack.submit("train", {**TRAIN, "method": "baseline"})
    method = stack.submit("train", {**TRAIN, "method": "pdd"})
    ev = stack.submit("evaluate", {
        "target_job": method["id"], "baseline_job": base["id"], "n_examples": 40, "batch_size": 40,
        "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 20, "alpha_ratio": 0.1, "restarts": 2},
                    {"name": "fgsm", "eps": [0.1, 0.2, 0.3]}],
        "checks": {"n_examples": 20}})  # (small slices: what is checked is the plumbing, not the figures)
    assert set(ev["depends_on"]) == {method["id"], base["id"]}
    for j in (base, method):
        assert stack.wait_done(j["id"])["status"] == "succeeded"
    done = stack.wait_done(ev["id"])
    assert done["status"] == "succeeded", done

    out = stack.client.get(f"/v1/jobs/{ev['id']}/results").json()
    assert out["models"]["target"]["method"] == "pdd" and out["models"]["baseline"]["method"] == "baseline"
    tables = {t["name"]: t for t in out["tables"]}
    wb = tables["white_box_Linf"]
    assert wb["columns"] == ["attack", "model", "n", "eps 0.1", "eps 0.2", "eps 0.3"]
    n_by_row = {(row[0], row[1]): row[2] for row in wb["rows"]}
    assert {k: n_by_row.get(k) for k in [("pgd-20x2", "target"), ("pgd-20x2", "baseline"), ("fgsm", "target"),
                                         ("fgsm", "baseline")]} == dict.fromkeys(n_by_row.keys() & {
        ("pgd-20x2", "target"), ("pgd-20x2", "baseline"), ("fgsm", "target"), ("fgsm", "baseline")}, "40") | {}
    # the convergence check (PGD-40 from the same starts) runs on checks.n_examples images only
    assert n_by_row[("pgd-20x2 @40 steps (convergence check)", "target")] == "20"
    assert [row[0] for row in tables["clean"]["rows"]] == ["target", "baseline"]
    recs = [r for r in out["records"] if r["attack"] == "pgd-20x2"]
    assert {r["model"] for r in recs} == {"target", "baseline"} and len(recs) == 6
    for r in recs:
        assert r["n_examples"] == 40 and r["seed"] == 0 and r["attack_params"]["steps"] == 20
        assert 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0
    assert "White-box robust accuracy" in out["markdown"]

    items = {a["name"] for a in stack.client.get(f"/v1/jobs/{ev['id']}/artifacts").json()["items"]}
    assert {"results.json", "report.md", "robust_acc_vs_eps_Linf.png"} <= items
    png = stack.client.get(f"/v1/jobs/{ev['id']}/artifacts/robust_acc_vs_eps_Linf.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
