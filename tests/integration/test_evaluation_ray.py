"""Evaluate jobs through ``workers/ray_eval.py`` on a real local Ray with real MNIST checkpoints:
shards merge to the one-process result; a cancelled job resumes from its saved per-example state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ensemble_core.training import train_local
from workers.errors import JobCancelled, UserError
from workers.ray_eval import run_evaluate_job, shard_ranges

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    root = tmp_path_factory.mktemp("eval-ray")
    out = {}
    for name, seed in (("target", 0), ("surrogate", 1)):
        spec = {"method": "baseline", "dataset": "mnist", "members": 2, "epochs": 1, "train_subset": 4000,
                "seed": seed, "eval_subset": 200}
        _, path = train_local(spec, root / name, progress=False, log=lambda m: None)
        out[name] = str(path)
    return {"target": out["target"], "surrogate": out["surrogate"], "baseline": None}


def _spec(ckpts: dict[str, str | None], workers: int) -> dict:
    return {"target_checkpoint": ckpts["target"], "transfer_from_checkpoint": ckpts["surrogate"],
            "n_examples": 160, "batch_size": 40, "workers": workers,
            "attacks": [{"name": "pgd", "eps": [0.1, 0.2], "steps": 10, "restarts": 2}],
            "transfer_attacks": [{"name": "fgsm", "eps": [0.1, 0.2], "losses": ["ce", "cw"]}],
            "checks": {"n_examples": 40}}


def _run(spec: dict, ckpts: dict[str, str | None], out: Path, should_stop=lambda: False,  # noqa: ANN001
         progress: list | None = None) -> dict:
    return run_evaluate_job(spec, job_id=out.name, artifacts_dir=str(out), checkpoints=ckpts,
                            on_progress=lambda f, m: progress.append(f) if progress is not None else None,
                            should_stop=should_stop, log=print)


def test_shard_ranges() -> None:
    assert shard_ranges(4, 2) == [(0, 2), (2, 4)]
    assert shard_ranges(5, 2) == [(0, 3), (3, 5)]
    assert shard_ranges(2, 8) == [(0, 1), (1, 2)]
    assert shard_ranges(3, 1) == [(0, 3)]


def test_sharded_job_equals_the_in_process_job(ray_session: None, ckpts: dict[str, str | None],
                                               tmp_path: Path) -> None:
    progress: list[float] = []
    sharded = _run(_spec(ckpts, 2), ckpts, tmp_path / "sharded", progress=progress)
    single = _run(_spec(ckpts, 1), ckpts, tmp_path / "single")
    assert sharded["shards"] == 2 and single["shards"] == 1
    assert sharded["records"] == single["records"]
    assert sharded["flags"] == single["flags"]
    assert sharded["member_transfer"] == single["member_transfer"]
    a = json.loads((tmp_path / "sharded" / "per_example.json").read_text())
    b = json.loads((tmp_path / "single" / "per_example.json").read_text())
    assert a["columns"] == b["columns"] and a["test_indices"] == b["test_indices"]
    assert progress and progress[-1] == 1.0
    for name in ("results.json", "report.md", "robust_acc_vs_eps_Linf.png", "transfer_acc_vs_eps.png"):
        assert (tmp_path / "sharded" / name).exists()
    assert sorted((tmp_path / "sharded" / "eval_state").glob("shard-*-of-2.json"))


def test_cancelled_job_resumes_from_its_state(ray_session: None, ckpts: dict[str, str | None],
                                             tmp_path: Path) -> None:
    out = tmp_path / "job"
    progress: list[float] = []
    with pytest.raises(JobCancelled):
        _run(_spec(ckpts, 2), ckpts, out, should_stop=lambda: bool(progress), progress=progress)
    states = sorted((out / "eval_state").glob("shard-*.json"))
    assert states
    done_before = sum(len(json.loads(p.read_text())["done"]) for p in states)
    assert done_before > 0
    resumed = _run(_spec(ckpts, 2), ckpts, out)
    fresh = _run(_spec(ckpts, 1), ckpts, tmp_path / "fresh")
    assert resumed["records"] == fresh["records"]


def test_bad_specs_are_user_errors(ckpts: dict[str, str | None], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"attacks\.0\.name"):
        _run({"target_checkpoint": "x", "attacks": [{"name": "nope"}]}, ckpts, tmp_path / "a")
    with pytest.raises(UserError, match="transfer_attacks"):
        _run({"target_checkpoint": "x", "transfer_attacks": [{"name": "fgsm"}]},
             {"target": ckpts["target"], "surrogate": None, "baseline": None}, tmp_path / "b")
    with pytest.raises(UserError, match="does not exist"):
        _run({"target_checkpoint": "x"}, {"target": str(tmp_path / "missing.pt"), "surrogate": None,
                                          "baseline": None}, tmp_path / "c")
