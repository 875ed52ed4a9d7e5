"""The warm path for one-worker train jobs (``workers/warm.py``) on a real local Ray and real MNIST.

What the cold path guarantees must hold here too (docs/reliability.md): the same weights as Ray Train's run
of the same spec; an actor kept and reused between jobs; a cancelled run resumed from its last epoch with
the weights of an uninterrupted run; a killed actor replaced within the attempt and the run resumed; either
path resuming from the other's checkpoints; idle actors giving their cores back.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.errors import JobCancelled

pytestmark = pytest.mark.integration

# 2 members, 2 epochs of 24 steps of 64 (long enough that a stop or a kill lands inside epoch 2), SGD with
# momentum (its state must resume too).
SPEC: dict[str, Any] = dict(method="baseline", dataset="mnist", members=2, epochs=2, batch_size=64,
                            train_subset=1536, val_size=0, eval_subset=200, workers=1, seed=5,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
PID = re.compile(r"warm trainer on host .*, pid (\d+): job (\d+) of this process")


class Recorder:
    def __init__(self, stop_after_epoch: int | None = None, on_epoch_1: Any = None) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self.stop_after_epoch = stop_after_epoch
        self.on_epoch_1 = on_epoch_1

    def on_epoch(self, m: dict[str, Any]) -> None:
        self.epochs.append(m)
        if len(self.epochs) == 1 and self.on_epoch_1 is not None:
            self.on_epoch_1(self)

    def should_stop(self) -> bool:
        return self.stop_after_epoch is not None and len(self.epochs) >= self.stop_after_epoch

    def log(self, line: str) -> None:
        self.logs.append(line)

    def warm_pids(self) -> list[tuple[int, int]]:
        return [(int(m.group(1)), int(m.group(2))) for line in self.logs if (m := PID.search(line))]


def _run(tmp: Path, job_id: str, rec: Recorder, *, warm: bool, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    from workers.ray_train import run_train_job

    old = os.environ.get("RE_WARM_TRAIN")
    os.environ["RE_WARM_TRAIN"] = "1" if warm else "0"
    try:
        return run_train_job(spec or SPEC, job_id=job_id, storage_path=str(tmp / "storage"),
                             artifacts_dir=str(tmp / "artifacts" / job_id), on_epoch=rec.on_epoch,
                             should_stop=rec.should_stop, log=rec.log)
    finally:
        if old is None:
            os.environ.pop("RE_WARM_TRAIN", None)
        else:
            os.environ["RE_WARM_TRAIN"] = old


def _weights(tmp: Path, job_id: str) -> dict[str, torch.Tensor]:
    from ensemble_core.checkpoint import load_checkpoint

    state = load_checkpoint(tmp / "artifacts" / job_id / "ensemble.pt")
    return {f"{i}.{k}": v for i, sd in enumerate(state["members"]) for k, v in sd.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def work(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from workers.warm import POOL

    yield tmp_path_factory.mktemp("warm-train")
    POOL.release_idle()  # give the session's Ray its cores back


@pytest.fixture(scope="module")
def warm_run(work: Path) -> Recorder:
    rec = Recorder()
    out = _run(work, "warm-a", rec, warm=True)
    assert out["metrics"], out
    return rec


def test_the_warm_path_trains_the_weights_of_ray_trains_run(work: Path, warm_run: Recorder) -> None:
    cold = Recorder()
    _run(work, "cold-a", cold, warm=False)
    assert [e["epoch"] for e in warm_run.epochs] == [e["epoch"] for e in cold.epochs] == [1, 2]
    assert warm_run.warm_pids() and not cold.warm_pids()
    _assert_same(_weights(work, "warm-a"), _weights(work, "cold-a"))
    # the start-up breakdown of each path (workers/startup.py): the warm path has no process group to set up
    warm = json.loads((work / "artifacts" / "warm-a" / "results.json").read_text())["startup_s"]
    cold_parts = json.loads((work / "artifacts" / "cold-a" / "results.json").read_text())["startup_s"]
    assert list(warm) == ["prepare", "ray_scheduling..train_session", "imports",
                          "run_setup", "data", "model_build", "first_batch", "total"]
    assert {"ray_scheduling", "worker_start", "process_group"} <= set(cold_parts)


def test_the_actor_is_kept_and_reused_for_the_next_job(work: Path, warm_run: Recorder) -> None:
    from workers.warm import POOL

    b, c = Recorder(), Recorder()
    _run(work, "warm-b", b, warm=True)
    assert POOL.idle_count() == 1  # kept after the job
    _run(work, "warm-c", c, warm=True)
    (pid_b, n_b), = b.warm_pids()
    (pid_c, n_c), = c.warm_pids()
    assert pid_c == pid_b and n_c == n_b + 1, (b.logs, c.logs)
    assert any("(reused," in line for line in c.logs)
    # nothing of the earlier jobs leaked into the later ones
    _assert_same(_weights(work, "warm-b"), _weights(work, "warm-a"))
    _assert_same(_weights(work, "warm-c"), _weights(work, "warm-a"))


def test_a_cancelled_warm_run_resumes_to_the_uninterrupted_weights(work: Path, warm_run: Recorder) -> None:
    first = Recorder(stop_after_epoch=1)
    with pytest.raises(JobCancelled):
        _run(work, "warm-cancel", first, warm=True)
    assert [e["epoch"] for e in first.epochs] == [1]
    assert (work / "storage" / "warm-cancel" / "warm" / "epoch-00001.pt").is_file()
    again = Recorder()
    _run(work, "warm-cancel", again, warm=True)
    assert [e["epoch"] for e in again.epochs] == [2]
    assert any("resuming from warm/epoch-00001.pt" in line for line in again.logs), again.logs
    _assert_same(_weights(work, "warm-cancel"), _weights(work, "warm-a"))


def test_a_killed_actor_is_replaced_and_the_run_resumes(work: Path, warm_run: Recorder) -> None:
    def kill(rec: Recorder) -> None:  # epoch 1's state is on disk; two epochs remain
        (pid, _), = rec.warm_pids()[-1:]
        os.kill(pid, signal.SIGKILL)

    rec = Recorder(on_epoch_1=kill)
    _run(work, "warm-kill", rec, warm=True, spec={**SPEC, "epochs": 3})
    assert any("the warm trainer died" in line for line in rec.logs), rec.logs
    assert len({pid for pid, _ in rec.warm_pids()}) == 2
    assert any("resuming from warm/epoch-00001.pt" in line for line in rec.logs)
    assert [e["epoch"] for e in rec.epochs] == [1, 2, 3]  # nothing redone but the epoch in progress


def test_each_path_resumes_from_the_others_checkpoints(work: Path, warm_run: Recorder) -> None:
    # cold first, cancelled after epoch 1; the warm path resumes from Ray Train's checkpoint
    with pytest.raises(JobCancelled):
        _run(work, "cold-then-warm", Recorder(stop_after_epoch=1), warm=False)
    rec = Recorder()
    _run(work, "cold-then-warm", rec, warm=True)
    assert any(re.search(r"resuming from checkpoint_[^/]*/state\.pt", line) for line in rec.logs), rec.logs
    assert [e["epoch"] for e in rec.epochs] == [2]
    _assert_same(_weights(work, "cold-then-warm"), _weights(work, "warm-a"))
    # warm first, cancelled after epoch 1; Ray Train's run resumes from the warm state
    with pytest.raises(JobCancelled):
        _run(work, "warm-then-cold", Recorder(stop_after_epoch=1), warm=True)
    rec = Recorder()
    _run(work, "warm-then-cold", rec, warm=False)
    assert any("resuming from the warm path's state epoch-00001.pt" in line for line in rec.logs), rec.logs
    assert [e["epoch"] for e in rec.epochs] == [2]
    _assert_same(_weights(work, "warm-then-cold"), _weights(work, "warm-a"))


def test_idle_actors_give_their_cores_back(work: Path, warm_run: Recorder) -> None:
    import time

    import ray

    from workers.warm import POOL

    _run(work, "warm-idle", Recorder(), warm=True)
    assert POOL.idle_count() >= 1
    held = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)
    assert held >= 1.0
    assert POOL.release_idle() >= 1 and POOL.idle_count() == 0
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == ray.cluster_resources()["CPU"]
