"""Automatic flags: each check on hand-made numbers, and end to end on a gradient-masking model
(a quantisation layer) against the same model without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensemble_core.data import DatasetInfo, TensorDataset, synthetic_dataset
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation import run_evaluation
from ensemble_core.evaluation.flags import (
    Flag,
    apply_flags,
    check_convergence,
    check_large_eps,
    check_monotone,
    check_probability_outputs,
    check_randomized,
    check_unit_test,
    check_weaker_attack_beats_stronger,
    check_zero_gradients,
)

torch.set_num_threads(1)
INFO = DatasetInfo("synthetic", 10, 1, 8, (0.5,), (0.25,), False)


def test_monotone_rise_and_no_progress() -> None:
    assert check_monotone("t", "pgd", {0.1: 0.5, 0.2: 0.3, 0.3: 0.0}, 0.9, 0.02, "white-box") == []
    [f] = check_monotone("t", "pgd", {0.1: 0.3, 0.2: 0.4}, 0.9, 0.02, "white-box")
    assert f.name == "accuracy_not_decreasing_with_eps" and f.value == pytest.approx(0.1) and f.attack == "pgd"
    assert check_monotone("t", "pgd", {0.1: 0.3, 0.2: 0.31}, 0.9, 0.02, "white-box") == []  # within tolerance
    [f] = check_monotone("t", "pgd", {0.1: 0.9, 0.3: 0.9}, 0.9, 0.02, "white-box")
    assert "no progress" in f.message
    # no progress at a tiny eps is not suspicious
    assert check_monotone("t", "pgd", {0.004: 0.9}, 0.9, 0.02, "white-box") == []


def test_weaker_attack_beats_stronger_same_or_larger_eps() -> None:
    wb = {0.1: 0.5, 0.2: 0.2}
    assert check_weaker_attack_beats_stronger("t", "x", {0.1: 0.6, 0.2: 0.25}, wb, 0.02, "square") == []
    [f] = check_weaker_attack_beats_stronger("t", "x", {0.1: 0.1}, wb, 0.02, "square")
    # 0.1 at eps 0.1 beats the white-box 0.5 at eps 0.1 and 0.2 at eps 0.2; the larger gap is reported
    assert f.details == {"eps_weak": 0.1, "eps_white_box": 0.1, "acc_weak": 0.1, "acc_white_box": 0.5}
    assert f.value == pytest.approx(0.4)
    assert check_weaker_attack_beats_stronger("t", "x", {0.3: 0.1}, wb, 0.02, "transfer") == []  # larger eps


def test_model_level_checks() -> None:
    assert check_randomized("t", 0, 100) == []
    assert check_randomized("t", 3, 100)[0].threats[-1] == "transfer"
    assert check_probability_outputs("t", "mean_probs", 10, 100) == []
    assert check_probability_outputs("t", "mean_probs", 100, 100)[0].name == "probability_outputs"
    assert check_zero_gradients("t", 0, 5, 100) == []  # CE can saturate; the margin gradient decides
    assert check_zero_gradients("t", 2, 2, 100)[0].value == pytest.approx(0.02)
    assert check_large_eps("t", "Linf", 0.5, 0.1, 100, 0.12, 0.02) == []
    assert check_large_eps("t", "Linf", 0.5, 0.3, 100, 0.12, 0.02)[0].name == "not_chance_at_large_eps"
    assert check_convergence("t", "pgd", 0.2, 40, 0.30, 0.29, 100, 0.02) == []
    assert check_convergence("t", "pgd", 0.2, 40, 0.30, 0.20, 100, 0.02)[0].name == "pgd_not_converged"
    assert check_unit_test("t", "pgd", 0.1, 0, 16, ("white-box",)) == []
    assert check_unit_test("t", "pgd", 0.1, 2, 16, ("white-box",))[0].eps == 0.1


def test_apply_flags_scopes() -> None:
    recs = [{"model": "t", "threat": "white-box", "attack": "pgd", "eps": 0.1},
            {"model": "t", "threat": "white-box", "attack": "fgsm", "eps": 0.1},
            {"model": "t", "threat": "transfer", "attack": "pgd", "eps": 0.1},
            {"model": "b", "threat": "white-box", "attack": "pgd", "eps": 0.1}]
    flags = [Flag("zero_gradients", "t", "m"), Flag("attack_failed_unit_test", "t", "m", attack="pgd", eps=0.1,
                                                     threats=("white-box",))]
    apply_flags(recs, flags)
    assert recs[0]["flags"] == ["attack_failed_unit_test", "zero_gradients"] and recs[0]["unreliable"]
    assert recs[1]["flags"] == ["zero_gradients"]
    assert recs[2]["flags"] == [] and not recs[2]["unreliable"]  # a transfer result is not a gradient result
    assert recs[3]["flags"] == []


class Quantize(nn.Module):
    """Round to 4 grey levels: the forward pass works, the input gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


def _members(seed: int, k: int = 3) -> list[nn.Module]:
    ds = synthetic_dataset(n=800, seed=50 + seed, size=8)
    x, y = TensorDataset(ds.images, ds.labels, INFO).as_float()
    out = []
    for i in range(k):
        torch.manual_seed(seed * 10 + i)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(m(Quantize()(x)), y).backward()
            opt.step()
        out.append(m.eval())
    return out


def test_flags_fire_on_quantised_model_and_stay_quiet_without_it() -> None:
    members = _members(0)
    plain = Ensemble(members, "mean_logits").eval()
    masked = Ensemble([nn.Sequential(Quantize(), m) for m in members], "mean_logits").eval()
    surrogate = Ensemble(_members(1, 2), "log_mean_probs").eval()
    ds = synthetic_dataset(n=1200, seed=9, size=8)
    test = TensorDataset(ds.images, ds.labels, INFO)
    spec = {"target_checkpoint": "in-memory", "n_examples": 60, "batch_size": 60,
            "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 20},
                        {"name": "square", "eps": [0.1, 0.2, 0.3], "n_queries": 300}],
            "transfer_attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 10, "alpha_ratio": 0.2}],
            "checks": {"n_examples": 60}}
    r_masked = run_evaluation(spec, masked, surrogates=[surrogate], test_set=test, log=lambda m: None)
    names = {f["name"] for f in r_masked["flags"]}
    assert {"zero_gradients", "accuracy_not_decreasing_with_eps", "not_chance_at_large_eps",
            "gradient_free_beats_white_box", "transfer_beats_white_box"} <= names
    pgd = [q for q in r_masked["records"] if q["attack"] == "pgd-20"]
    assert all(q["unreliable"] for q in pgd)
    r_plain = run_evaluation(spec, plain, surrogates=[surrogate], test_set=test, log=lambda m: None)
    assert r_plain["flags"] == [], r_plain["flags"]
    assert not r_plain["unreliable"]
    accs = [q["robust_acc"] for q in r_plain["records"] if q["attack"] == "pgd-20"]
    assert accs == sorted(accs, reverse=True) and accs[-1] <= 0.05
