"""Tune jobs on a real local Ray and real MNIST subsets.

1. A DKD search over ζ and the learning rate with ASHA, run directly: ASHA stops the trials with a
   useless learning rate early; the best config, its train spec and its checkpoint come out.
2. A CLDL search over α and β submitted through ``POST /v1/jobs`` and run by a real worker against a
   real PostgreSQL: the trials are child rows readable over REST with their metric history, the best
   config is in the job's results, and one call queues a full train job from it.
3. A search stopped half-way (``should_stop``) stops every trial, and the same job resumes: trials
   continue from their checkpoints instead of starting again.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from workers.errors import JobCancelled

pytestmark = pytest.mark.integration

SMALL = {"dataset": "mnist", "members": 2, "batch_size": 64, "train_subset": 640, "seed": 0,
         "optimizer": {"name": "adam", "lr": 1e-3}}


class Trials:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.logs: list[str] = []

    def on_trials(self, trials: list[dict[str, Any]]) -> None:
        self.calls.append(trials)

    @property
    def last(self) -> dict[str, dict[str, Any]]:
        return {t["trial_id"]: t for t in self.calls[-1]}


def test_asha_stops_bad_dkd_trials_early_and_exposes_the_best(ray_session: None, tmp_path: Path) -> None:
    from ensemble_core.checkpoint import load_ensemble
    from workers.ray_tune import run_tune_job

    spec = {"base": {**SMALL, "method": "dkd", "epochs": 2},
            # lr is a grid (listed order: the useful rates start first); zeta is sampled per trial
            "search_space": {"zeta": {"type": "uniform", "low": 0.3, "high": 0.9},
                             "lr": {"type": "grid", "values": [3e-3, 1e-3, 1e-7, 1e-8]}},
            "num_samples": 1, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
            "max_concurrent_trials": 2, "val_size": 500, "metric": "val_clean_acc", "mode": "max"}
    rec = Trials()
    t0 = time.monotonic()
    out = run_tune_job(spec, job_id="dkd-search", storage_path=str(tmp_path / "storage"),
                       artifacts_dir=str(tmp_path / "art"), on_trials=rec.on_trials, should_stop=lambda: False,
                       log=rec.logs.append)
    print(f"\n4-trial DKD ASHA search: {time.monotonic() - t0:.1f} s; " + "; ".join(
        f"lr {t['config']['lr']:g} zeta {t['config']['zeta']:.2f}: {t['epochs_done']} it, best {t['best']}"
        for t in rec.last.values()))
    trials = rec.last
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials.values())
    stopped = [t for t in trials.values() if t["stopped_early"]]
    assert stopped, "ASHA stopped no trial"
    assert all(t["epochs_done"] < t["total_epochs"] == 4 for t in stopped)
    assert {t["config"]["lr"] for t in stopped} & {1e-7, 1e-8}
    for t in trials.values():
        assert 0.3 <= t["config"]["zeta"] <= 0.9
        assert [h["training_iteration"] for h in t["history"]] == list(range(1, t["epochs_done"] + 1))
        for h in t["history"]:
            assert "val_clean_acc" in h and not any(k.startswith(("sel_", "test_")) for k in h)
    best = out["best"]
    assert best["config"]["lr"] in (3e-3, 1e-3)
    assert best["value"] == max(t["last"] for t in trials.values() if t["epochs_done"] == 4)
    assert best["train_spec"]["hyperparameters"]["zeta"] == best["config"]["zeta"]
    assert best["train_spec"]["optimizer"]["lr"] == best["config"]["lr"]
    assert best["train_spec"]["val_size"] == 0  # the full job keeps the base's own split
    assert out["metrics"]["trials_stopped_early"] == len(stopped)
    ens = load_ensemble(tmp_path / "art" / "best_trial.pt")
    assert len(ens) == 2
    record = json.loads((tmp_path / "art" / "tune_results.json").read_text())
    assert record["best"]["trial_id"] == best["trial_id"] and len(record["trials"]) == 4


def test_cldl_search_through_the_rest_api_with_trials_and_best_config(
        ray_session: None, pg_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service import migrate
    from service.app import create_app
    from service.routes_tune import register_tune_routes
    from service.settings import Settings
    from workers.worker import Worker

    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, retry_backoff_seconds=0.0)
    app = create_app(settings, warm=False)
    register_tune_routes(app, app.state.queue)  # no-op when the app already has the route
    spec = {"base": {**SMALL, "method": "cldl", "epochs": 2},
            "search_space": {"alpha": {"type": "choice", "values": [0.5, 2.0]},
                             "beta": {"type": "loguniform", "low": 0.05, "high": 1.0}},
            "num_samples": 2, "scheduler": "asha", "max_concurrent_trials": 2, "val_size": 500, "seed": 3,
            # select on a weighted sum of clean and PGD-10 accuracy on 100 held-out images
            "metric": "objective", "objective": {"val_clean_acc": 0.5, "val_robust_acc": 0.5},
            "robust": {"eps": 0.1, "steps": 10, "n_examples": 100}}
    with TestClient(app) as client:
        bad = client.post("/v1/jobs", json={"kind": "tune", "spec": {**spec, "search_space": {
            "alpha": {"type": "choice", "values": [0.5]}, "zeta": {"type": "choice", "values": [0.5]}}}})
        assert bad.status_code == 422 and "spec.search_space.zeta" in [d["field"] for d in bad.json()["detail"]]
        r = client.post("/v1/jobs", json={"kind": "tune", "spec": spec})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        early = client.post(f"/v1/jobs/{job_id}/train-best")
        assert early.status_code == 409  # the search has not run yet

        t0 = time.monotonic()
        worker = Worker(settings, engine=app.state.queue.engine)
        worker.run(max_jobs=1)
        print(f"\nCLDL search through the worker: {time.monotonic() - t0:.1f} s")

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        trials = client.get(f"/v1/jobs/{job_id}/trials").json()
        assert trials["total"] == 2
        for t in trials["items"]:
            assert t["kind"] == "trial" and t["parent_id"] == job_id and t["status"] == "succeeded"
            config = t["spec"]["config"]
            assert config["alpha"] in (0.5, 2.0) and 0.05 <= config["beta"] <= 1.0
            history = t["result"]["history"]
            assert history and all({"val_clean_acc", "val_robust_acc", "objective"} <= set(h) for h in history)
            for h in history:
                assert h["objective"] == pytest.approx(0.5 * h["val_clean_acc"] + 0.5 * h["val_robust_acc"])
        results = client.get(f"/v1/jobs/{job_id}/results").json()
        best = results["best"]
        assert best["metric"] == "objective" and set(best["config"]) == {"alpha", "beta"}
        listed = {t["spec"]["trial_id"]: t["result"]["last"] for t in trials["items"]}
        assert best["value"] == pytest.approx(max(listed.values()))
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
        names = json.dumps(artifacts)
        assert "best_trial.pt" in names and "tune_results.json" in names

        full = client.post(f"/v1/jobs/{job_id}/train-best", json={"overrides": {"epochs": 3}})
        assert full.status_code == 201, full.text
        train = full.json()
        assert train["kind"] == "train" and train["status"] == "queued"
        assert train["spec"]["method"] == "cldl" and train["spec"]["epochs"] == 3
        assert train["spec"]["hyperparameters"]["alpha"] == best["config"]["alpha"]
        assert train["spec"]["hyperparameters"]["beta"] == pytest.approx(best["config"]["beta"])
        bad = client.post(f"/v1/jobs/{job_id}/train-best", json={"overrides": {"members": 0}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "overrides.members"
        assert client.post(f"/v1/jobs/{train['id']}/train-best").status_code == 409
        assert client.post(f"/v1/jobs/{uuid.uuid4()}/train-best").status_code == 404


def test_a_stopped_search_stops_every_trial_and_the_same_job_resumes(ray_session: None, tmp_path: Path) -> None:
    from workers.ray_tune import run_tune_job

    spec = {"base": {**SMALL, "method": "baseline", "epochs": 4, "train_subset": 1280},
            "search_space": {"lr": {"type": "grid", "values": [1e-3, 2e-3]}}, "num_samples": 1,
            "scheduler": "fifo", "max_concurrent_trials": 2, "val_size": 500}
    kwargs = dict(job_id="stopped-search", storage_path=str(tmp_path / "storage"),
                  artifacts_dir=str(tmp_path / "art"))
    rec = Trials()
    stop_at: dict[str, float] = {}

    def stop_after_two_epochs() -> bool:
        done = any(t["epochs_done"] >= 2 for t in rec.calls[-1]) if rec.calls else False
        if done and "t" not in stop_at:
            stop_at["t"] = time.monotonic()
        return done

    with pytest.raises(JobCancelled):
        run_tune_job(spec, on_trials=rec.on_trials, should_stop=stop_after_two_epochs, log=rec.logs.append,
                     **kwargs)
    print(f"\nsearch stopped {time.monotonic() - stop_at['t']:.1f} s after should_stop() turned true")
    assert time.monotonic() - stop_at["t"] < 30
    first = rec.last
    assert len(first) == 2 and all(t["cancelled"] for t in first.values())
    assert all(t["epochs_done"] < 4 for t in first.values())

    rec2 = Trials()
    out = run_tune_job(spec, on_trials=rec2.on_trials, should_stop=lambda: False, log=rec2.logs.append, **kwargs)
    assert any("resuming the search" in line for line in rec2.logs)
    second = rec2.last
    assert set(second) == set(first)  # the same trials, none added
    assert all(t["epochs_done"] == 4 and t["status"] == "TERMINATED" for t in second.values())
    resumed = [t for t in second.values() if (t["first_reported_iteration"] or 0) > 1]
    assert resumed, "no trial continued from its checkpoint"
    for t in second.values():  # the earlier epochs are still in the history (from the stored results)
        assert [h["training_iteration"] for h in t["history"]] == [1, 2, 3, 4]
    assert out["best"]["config"]["lr"] in (1e-3, 2e-3)
