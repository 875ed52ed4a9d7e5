"""A multi-objective Optuna (TPE) search on a real local Ray, a real PostgreSQL and a real MNIST subset.

A baseline search over label smoothing optimises clean and PGD accuracy on held-out images together:
submitted through ``POST /v1/jobs`` (bad multi-objective input is a 422 naming the field), run by a real
worker (``workers.worker.run_tune`` -> ``workers.ray_tune.run_tune_job``), its Pareto front read from
the job's results and from ``GET /v1/jobs/{id}/pareto``: non-dominated, the trials' own last values, the
best trial on it, the PNG among the artifacts, the importance present or its reason recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_two_objective_optuna_search_serves_its_pareto_front(
        ray_session: None, pg_url: str, tmp_path: Path) -> None:
    import optuna  # noqa: F401 (a requirement: missing, the test fails)
    from fastapi.testclient import TestClient

    from service import migrate
    from service.app import create_app
    from service.settings import Settings
    from workers.tune_analysis import dominates
    from workers.worker import Worker

    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, retry_backoff_seconds=0.0)
    app = create_app(settings, warm=False)
    spec = {"base": {"method": "baseline", "dataset": "mnist", "members": 2, "epochs": 1, "batch_size": 64,
                     "train_subset": 500, "seed": 0, "optimizer": {"name": "adam", "lr": 1e-3}},
            "search_space": {"label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2}},
            "search_alg": "optuna", "metrics": ["val_clean_acc", "val_robust_acc"], "modes": ["max", "max"],
            "num_samples": 4, "max_concurrent_trials": 2, "val_size": 200, "seed": 1,
            "robust": {"eps": 0.05, "steps": 5, "n_examples": 50}}
    with TestClient(app) as client:
        bad = client.post("/v1/jobs", json={"kind": "tune", "spec": {**spec, "scheduler": "asha"}})
        assert bad.status_code == 422 and "spec.scheduler" in [d["field"] for d in bad.json()["detail"]]
        r = client.post("/v1/jobs", json={"kind": "tune", "spec": spec})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert r.json()["spec"]["scheduler"] == "fifo"
        early = client.get(f"/v1/jobs/{job_id}/pareto")
        assert early.status_code == 409  # not run yet

        t0 = time.monotonic()
        Worker(settings, engine=app.state.queue.engine).run(max_jobs=1)
        print(f"\n4-trial 2-objective Optuna search through the worker: {time.monotonic() - t0:.1f} s")

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        trials = client.get(f"/v1/jobs/{job_id}/trials").json()["items"]
        assert len(trials) == 4
        last = {}
        for t in trials:
            assert 0.0 <= t["spec"]["config"]["label_smoothing"] <= 0.2
            h = t["result"]["history"][-1]
            last[t["spec"]["trial_id"]] = (h["val_clean_acc"], h["val_robust_acc"])
        results = client.get(f"/v1/jobs/{job_id}/results").json()
        front = client.get(f"/v1/jobs/{job_id}/pareto").json()
        assert front["trials"] == results["pareto_front"]["trials"]
        print("trials (clean, robust):", last, "front:", [t["trial_id"] for t in front["trials"]],
              "importance:", front["param_importance"], front["param_importance_reason"])
        ids = {t["trial_id"] for t in front["trials"]}
        assert ids and ids <= set(last) and front["candidates"] == 4
        modes = ["max", "max"]
        for tid, v in last.items():  # the front is exactly the non-dominated trials
            assert any(dominates(w, v, modes) for o, w in last.items() if o != tid) == (tid not in ids)
        for t in front["trials"]:
            assert (t["values"]["val_clean_acc"], t["values"]["val_robust_acc"]) == last[t["trial_id"]]
        assert results["best"]["trial_id"] in ids and results["metrics"]["pareto_front_size"] == len(ids)
        if front["param_importance"] is not None:
            assert set(front["param_importance"]) == {"val_clean_acc", "val_robust_acc"}
        else:
            assert front["param_importance_reason"]
        assert front["plot"] == "pareto_front.png"
        png = client.get(front["plot_url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(f"/v1/jobs/{trials[0]['id']}/pareto").status_code == 409  # a trial row has none
