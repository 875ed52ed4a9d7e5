"""``ensemble_core.reproduce``: the protocol's numbers, the shared-cache key, the lock and the report."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble_core import reproduce
from ensemble_core.data import DatasetInfo, TensorDataset, synthetic_dataset
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation import run_evaluation
from ensemble_core.spec import EvaluateSpec, TrainSpec

torch.set_num_threads(1)


def _args(*argv: str):  # noqa: ANN202
    return reproduce.build_parser().parse_args(["baseline", *argv])


def test_training_budget_follows_the_protocol_at_three_epochs() -> None:
    s = reproduce.train_spec(_args(), "cldl", 3, 0)
    assert s["epochs"] == 3 and s["members"] == 3 and s["architecture"] == "lenet5" and s["dataset"] == "mnist"
    assert s["optimizer"] == {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4} and s["batch_size"] == 128
    assert s["seed"] == 0 and s.get("train_subset") is None and s["schedule"] == {"name": "constant"}
    TrainSpec.model_validate(s)
    f = reproduce.train_spec(_args("--dataset", "fashion_mnist", "--epochs", "30"), "baseline", 3, 1)
    assert f["schedule"] == {"name": "multistep", "milestones": [10, 20], "gamma": 0.1}
    q = reproduce.train_spec(_args("--quick"), "baseline", 5, 2)
    assert q["epochs"] == 1 and q["train_subset"] == 3000 and q["members"] == 5 and q["seed"] == 2


def test_budget_key_is_shared_across_methods_and_separates_budgets() -> None:
    a = reproduce.budget_of(reproduce.build_parser().parse_args(["cldl"]))
    b = reproduce.budget_of(reproduce.build_parser().parse_args(["pdd", "--hp", "alpha=2"]))
    assert a == b
    assert reproduce.budget_of(_args("--epochs", "5")) != a
    assert reproduce.budget_of(_args("--quick")) != a
    assert reproduce.budget_of(_args("--dataset", "fashion_mnist")) != a


def test_evaluation_follows_the_protocol() -> None:
    e = EvaluateSpec.model_validate(reproduce.eval_spec(_args(), "x.pt"))
    assert e.n_examples == 500 and e.transfer_n_examples == 2000 and e.split == "report" and e.seed == 0
    assert e.checks.n_examples == 500 and e.checks.convergence  # the convergence check on every white-box image
    names = [(a.name, tuple(a.losses or [a.loss])) for a in e.attacks]
    assert names == [("pgd", ("ce",)), ("pgd", ("cw", "dlr")), ("fgsm", ("ce", "cw")), ("square", ("cw",)),
                     ("mora", ("ce", "dlr")), ("pgd", ("vote", "softvote")), ("autoattack", ("ce",))]
    pgd = e.attacks[0]  # the earlier pages' headline, kept first
    assert (pgd.name, pgd.steps, pgd.alpha_ratio, pgd.restarts, pgd.eps) == ("pgd", 50, 0.1, 5, [0.1, 0.2, 0.3])
    assert e.attacks[3].n_queries == 1000 and e.attacks[4].steps == 100
    assert e.attacks[-1].eps == [0.2] and e.attacks[-1].version == "standard"  # reference AA at the middle eps
    assert e.transfer_attacks == []  # the library fills in PROTOCOL.md's transfer set for the data set
    aa = EvaluateSpec.model_validate(reproduce.eval_spec(_args("--autoattack", "all", "--dataset",
                                                               "fashion_mnist"), "x"))
    assert aa.attacks[0].eps == [0.05, 0.1, 0.15]
    assert aa.attacks[-1].name == "autoattack" and aa.attacks[-1].eps == [0.05, 0.1, 0.15]
    none = EvaluateSpec.model_validate(reproduce.eval_spec(_args("--autoattack", "none"), "x"))
    assert all(a.name != "autoattack" for a in none.attacks)


def test_hp_parsing() -> None:
    assert reproduce._parse_hp(["alpha=2.0", "K=3", "name=foo", "flag=true"]) == {
        "alpha": 2.0, "K": 3, "name": "foo", "flag": True}
    with pytest.raises(SystemExit):
        reproduce._parse_hp(["novalue"])


def test_file_lock_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with reproduce.file_lock(path, "test"), open(path, "a+") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "a+") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
def test_render_reports_every_part(tmp_path: Path) -> None:
    info = DatasetInfo("synthetic", 10, 1, 8, (0.5,), (0.25,), False)
    ds = synthetic_dataset(n=600, seed=3, size=8)
    x, y = TensorDataset(ds.images, ds.labels, info).as_float()

    def members(seed: int, k: int) -> list[nn.Module]:
        out = []
        for i in range(k):
            torch.manual_seed(seed * 7 + i)
            m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            opt = torch.optim.Adam(m.parameters(), lr=2e-2)
            for _ in range(40):
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
            out.append(m.eval())
        return out

    test = synthetic_dataset(n=1300, seed=4, size=8)
    test = TensorDataset(test.images, test.labels, info)
    args = _args("--quick", "--autoattack", "middle")
    spec = reproduce.eval_spec(args, "in-memory") | {"n_examples": 40, "transfer_n_examples": 60, "batch_size": 30}
    surr = {"baseline-3 (seed 1)": Ensemble(members(1, 3), "mean_logits"),
            "baseline-5 (seed 2)": Ensemble(members(2, 5), "mean_logits")}
    res = {name: run_evaluation(spec, Ensemble(members(s, 3), "mean_logits"), surrogates=surr, test_set=test,
                                log=lambda m: None) for name, s in (("baseline", 0), ("method", 5))}
    md = reproduce.render(args, "method", res["method"], res["baseline"], {"zeta": 1.0}, "python -m x", 62.0,
                          {"method": 10.0, "baseline": None})
    assert "Black-box transfer" in md and "White-box" in md and "Clean accuracy" in md
    assert "| baseline |" in md and "| method |" in md
    assert "FGSM ε=0.1" in md and "PGD-10×3 ε=0.25" in md  # attack × eps columns
    assert "among the images the model classifies correctly clean" in md
    assert "`--quick`" in md and "python -m x" in md and "Wall time of this invocation: 1.0 min" in md
    assert "evaluation compute, summed over resumed runs: baseline " in md and ", method " in md
    assert "Automatic flags" in md and "checks run" in md
    assert "higher in" in md  # the plain comparison sentence
    assert "any attack" in md and "white-box, worst case" in md and "transfer, worst case" in md
    assert "mora-" in md and "square-300q" in md and "@20 steps (convergence check)" in md
    assert "Evaluation code `" in md
