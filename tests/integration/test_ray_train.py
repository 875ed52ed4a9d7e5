"""``workers.ray_train.run_train_job`` on a real local Ray (Train V2, 2 workers, gloo DDP) and real MNIST.

Each ``fit()`` costs 20-30 s here, so the runs are shared: one uninterrupted 2-epoch run, one run
cancelled during epoch 2 and then resumed with the same job id (compared with the uninterrupted
weights), one run whose data is missing, and one run whose worker is killed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.errors import JobCancelled, UserError

pytestmark = pytest.mark.integration

# 2 members, 40 global steps of 64 per epoch (32 per rank), SGD with momentum (its state must resume too).
SPEC: dict[str, Any] = dict(method="baseline", dataset="mnist", members=2, epochs=2, batch_size=64,
                            train_subset=2560, val_size=256, eval_subset=500, workers=2, seed=3,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})


class Recorder:
    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self.threads: set[int] = set()

    def on_epoch(self, m: dict[str, Any]) -> None:
        self.threads.add(threading.get_ident())
        self.epochs.append(m)

    def log(self, line: str) -> None:
        self.logs.append(line)


def _run(tmp: Path, job_id: str, rec: Recorder, should_stop=lambda: False, spec=None) -> dict[str, Any]:
    from workers.ray_train import run_train_job

    return run_train_job(spec or SPEC, job_id=job_id, storage_path=str(tmp / "storage"),
                         artifacts_dir=str(tmp / "artifacts" / job_id), on_epoch=rec.on_epoch,
                         should_stop=should_stop, log=rec.log)


def _train_worker_pids() -> list[int]:
    """PIDs of this Ray session's Train workers (children of our raylet titled ray::RayTrainWorker)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def _cold_path() -> Iterator[None]:
    """This module is about Ray Train's ``fit()`` per job, the path with ``RE_WARM_DDP=0``; the default for
    multi-worker jobs, a warm DDP group, has its own tests (test_warm_ddp.py, test_service_e2e.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RE_WARM_DDP", "0")
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-train")


@pytest.fixture(scope="module")
def baseline(ray_session: None, work: Path) -> tuple[dict[str, Any], Recorder, float]:
    rec = Recorder()
    t0 = time.monotonic()
    out = _run(work, "baseline-job", rec)
    return out, rec, time.monotonic() - t0


def test_two_worker_run_reports_epochs_and_writes_a_loadable_ensemble(baseline, work: Path) -> None:
    from ensemble_core.checkpoint import load_checkpoint, load_ensemble
    from ensemble_core.data import load_dataset, test_subset
    from ensemble_core.training import clean_accuracy

    out, rec, seconds = baseline
    print(f"2-worker fit of 2 epochs: {seconds:.1f} s")
    assert [m["global_epoch"] for m in rec.epochs] == [1, 2]
    assert rec.threads == {threading.get_ident()}  # callbacks run on the caller's thread
    for m in rec.epochs:
        assert {"train_loss", "val_clean_acc", "sel_clean_acc", "lr", "epoch_time_s"} <= set(m)
    assert rec.epochs[1]["train_loss"] < rec.epochs[0]["train_loss"]
    assert any("stage 1 epoch 2" in line for line in rec.logs)  # rank 0's log lines reach the caller

    art = work / "artifacts" / "baseline-job"
    state = load_checkpoint(art / "ensemble.pt")
    assert state["progress"]["finished"] and json.loads(state["spec"])["workers"] == 2
    ens = load_ensemble(art / "ensemble.pt")
    assert len(ens) == 2
    # The reported test accuracy is the accuracy of the written file on the PROTOCOL report subset.
    test = test_subset(load_dataset("mnist", "test"), "report", n=500)
    acc = clean_accuracy(ens, test)["acc"]
    assert acc == pytest.approx(out["metrics"]["test_clean_acc"], abs=1e-9)
    assert acc > 0.8
    results = json.loads((art / "results.json").read_text())
    assert results["metrics"] == out["metrics"]
    assert [h["global_epoch"] for h in results["history"]] == [1, 2]
    assert results["test_subset"]["split"] == "report"
    # where the start-up went (workers/startup.py): every phase of the cold path, summing to the total
    parts = results["startup_s"]
    assert list(parts) == ["prepare", "ray_scheduling", "worker_start", "process_group", "train_session", "imports",
                           "run_setup", "data", "model_build", "first_batch", "total"]
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], abs=1e-6)
    assert 0 < parts["total"] < seconds and out["results"]["startup_s"] == parts
    assert any(line.startswith("start-up ") for line in rec.logs)


def test_cancel_stops_within_seconds_and_the_same_job_resumes_to_identical_weights(
        baseline, work: Path) -> None:
    from ensemble_core.checkpoint import load_checkpoint

    rec = Recorder()
    asked: dict[str, float] = {}

    def stop_after_first_epoch() -> bool:
        if rec.epochs and "t" not in asked:
            asked["t"] = time.monotonic()
        return bool(rec.epochs)

    with pytest.raises(JobCancelled):
        _run(work, "resumed-job", rec, should_stop=stop_after_first_epoch)
    latency = time.monotonic() - asked["t"]
    print(f"cancel took effect {latency:.1f} s after should_stop() turned true")
    assert latency < 15
    assert [m["global_epoch"] for m in rec.epochs] == [1]  # stopped during epoch 2
    assert not (work / "artifacts" / "resumed-job" / "ensemble.pt").exists()

    rec2 = Recorder()
    out = _run(work, "resumed-job", rec2)
    assert [m["global_epoch"] for m in rec2.epochs] == [2]  # resumed at epoch 2, not epoch 1
    assert any("resuming at stage 1/1, epoch 2/2" in line for line in rec2.logs)

    resumed = load_checkpoint(work / "artifacts" / "resumed-job" / "ensemble.pt")
    straight = load_checkpoint(work / "artifacts" / "baseline-job" / "ensemble.pt")
    for a, b in zip(resumed["members"], straight["members"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert out["metrics"] == baseline[0]["metrics"]
    assert [h["global_epoch"] for h in out["results"]["history"]] == [1, 2]


def test_spec_errors_are_user_errors_naming_the_field(ray_session: None, work: Path) -> None:
    with pytest.raises(UserError, match=r"members"):
        _run(work, "bad-spec", Recorder(), spec={**SPEC, "members": 0})
    with pytest.raises(UserError, match=r"batch_size.*divisible"):
        _run(work, "bad-batch", Recorder(), spec={**SPEC, "batch_size": 63})


def test_missing_data_in_the_workers_is_a_user_error(ray_session: None, work: Path) -> None:
    spec = {**SPEC, "dataset": "cifar10", "architecture": "resnet20", "data_dir": str(work / "no-cifar-here")}
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"cifar"):
        _run(work, "no-data", Recorder(), spec=spec)
    assert time.monotonic() - t0 < 90  # no worker-group retries for a user error


def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_last_checkpoint(
        ray_session: None, work: Path) -> None:
    spec = {**SPEC, "train_subset": 5120}  # 80 steps per epoch: the kill lands inside epoch 2
    snapshot = work / "storage" / "killed-job" / "checkpoint_manager_snapshot.json"
    rec = Recorder()
    killed: list[int] = []

    def on_epoch(m: dict[str, Any]) -> None:
        rec.on_epoch(m)
        if m["global_epoch"] == 1 and not killed:
            # Ray Train registers a reported checkpoint when its controller next polls the workers:
            # kill once epoch 1's checkpoint is in the run's snapshot.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if snapshot.exists() and json.loads(snapshot.read_text()).get("checkpoint_results"):
                    break
                time.sleep(0.1)
            pids = _train_worker_pids()
            assert len(pids) == 2, pids
            os.kill(max(pids), signal.SIGKILL)
            killed.append(max(pids))

    from workers.ray_train import run_train_job

    out = run_train_job(spec, job_id="killed-job", storage_path=str(work / "storage"),
                        artifacts_dir=str(work / "artifacts" / "killed-job"), on_epoch=on_epoch,
                        should_stop=lambda: False, log=rec.log)
    assert killed
    assert [m["global_epoch"] for m in rec.epochs] == [1, 2]  # epoch 1 was not trained again
    assert any("resuming at stage 1/1, epoch 2/2" in line for line in rec.logs)
    assert out["metrics"]["test_clean_acc"] > 0.8
    assert (work / "artifacts" / "killed-job" / "ensemble.pt").exists()
