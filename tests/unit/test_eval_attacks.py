"""Evaluation attacks: the CW objective, the engine's loops against torchattacks, and attack unit tests
(Zimmermann et al. 2022) on models where an adversarial example provably exists within eps."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation.attacks import (
    CWMasked,
    GradientAttack,
    MoraAttack,
    attack_label,
    build_attack,
    cw_objective,
    default_alpha,
    derive_seed,
    resolved_params,
    run_attack,
    run_scored,
    sanitize,
)
from ensemble_core.evaluation.sanity import attack_unit_test, verify_witness, witness_problem
from ensemble_core.spec import AttackSpec

torch.set_num_threads(1)


def test_cw_objective_hand_computed_on_non_positive_outputs() -> None:
    out = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    # row 0: max_{j≠0} = -2, margin -2 - (-1) = -1; row 1: max_{j≠1} = -1, margin -1 - (-2) = 1, capped at κ = 0.5
    val = cw_objective(out, y, kappa=0.5)
    assert val.tolist() == [-1.0, 0.5]
    (g,) = torch.autograd.grad(val.sum(), out)
    # row 0 pulls the runner-up up and the true class down; row 1 is capped: no gradient
    assert g.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_cw_objective_not_inert_where_onehot_product_is() -> None:
    """The pitfall: max((1 - onehot) * o) picks a masked 0 when every output is negative."""
    out = torch.tensor([[-0.1, -3.0, -4.0]])
    y = torch.tensor([0])
    onehot = torch.nn.functional.one_hot(y, 3).float()
    naive = torch.max((1 - onehot) * out, 1).values - torch.max(onehot * out, 1).values
    assert naive.item() == 0.0  # inert: both maxima are masked zeros
    assert cw_objective(out, y, kappa=10).item() == pytest.approx(-2.9)


def _linear_ensemble(combine: str) -> Ensemble:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 4)) for _ in range(3)]
    return Ensemble(members, combine).eval()


def _ours(ens: Ensemble, spec: AttackSpec, eps: float, loss: str = "ce") -> GradientAttack:
    return build_attack(ens, spec, eps, loss, num_classes=4)


@pytest.mark.parametrize("name,ours,ta", [
    ("fgsm", lambda m: _ours(m, AttackSpec(name="fgsm"), 0.1), lambda m: torchattacks.FGSM(m, eps=0.1)),
    ("bim", lambda m: _ours(m, AttackSpec(name="bim", steps=7, alpha=0.02), 0.1),
     lambda m: torchattacks.BIM(m, eps=0.1, alpha=0.02, steps=7)),
    ("mim", lambda m: _ours(m, AttackSpec(name="mim", steps=7, alpha=0.02, momentum=1.0), 0.1),
     lambda m: torchattacks.MIFGSM(m, eps=0.1, alpha=0.02, steps=7, decay=1.0)),
    ("pgd", lambda m: _ours(m, AttackSpec(name="pgd", steps=7, alpha=0.02), 0.1),
     lambda m: torchattacks.PGD(m, eps=0.1, alpha=0.02, steps=7, random_start=True)),
    ("pgdl2", lambda m: _ours(m, AttackSpec(name="pgdl2", steps=7, alpha=0.2), 1.0),
     lambda m: torchattacks.PGDL2(m, eps=1.0, alpha=0.2, steps=7, random_start=True)),
])
@pytest.mark.parametrize("combine", ["mean_logits", "log_mean_probs"])
def test_engine_reproduces_torchattacks_with_ce(name: str, ours, ta, combine: str) -> None:  # noqa: ANN001
    """Our loops differ from torchattacks only in what they add (objectives, scoring): with CE, identical examples."""
    ens = _linear_ensemble(combine)
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(2))
    atk = ours(ens)
    assert isinstance(atk, GradientAttack)
    a = run_attack(atk, x, y, seed=5)
    b = run_attack(ta(ens), x, y, seed=5)
    assert torch.equal(a, b), name
    # scoring every iterate changes nothing about the final iterate
    out = run_scored(atk, x, y, 5, ens.rule.predict_labels)
    assert torch.equal(out.final, b)


def test_mim_keeps_moving_along_its_momentum_where_the_gradient_is_zero() -> None:
    """Computed by hand. One member, two classes, y = 0; the margin z1 - z0 = sum(x - 0.5) - 0.05 over 4 pixels,
    so the CW objective min(margin, 0.1) has gradient 1 per pixel at x = 0.5 and 0 once the margin passes
    κ = 0.1. Step 1 (alpha 0.1): the normalised gradient is 1, x = 0.6, margin 0.35 > κ: every later gradient
    is 0. Our MIM adds 0 to the momentum and steps on, 0.7 then 0.8 (eps 0.3). torchattacks' MIFGSM divides
    0 by 0 there: its momentum turns NaN, sign(NaN) is 0, and it stays at 0.6."""

    def members(x: torch.Tensor) -> torch.Tensor:
        z1 = (x - 0.5).flatten(1).sum(1) - 0.05
        return torch.stack([torch.zeros_like(z1), z1], 1).unsqueeze(0)

    def objective(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cw_objective(z[0], y, kappa=0.1)

    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    atk = GradientAttack(members, objective, kind="mim", eps=0.3, alpha=0.1, steps=3, decay=1.0)
    adv = atk(x, y)
    assert torch.isfinite(adv).all()
    assert adv.flatten().tolist() == pytest.approx([0.8] * 4)
    # the same loop without the guard (torchattacks' division) stops after the first step
    g0 = torch.zeros_like(x)
    assert (torch.sign(g0 / torch.mean(torch.abs(g0), dim=(1, 2, 3), keepdim=True)) == 0).all()


def test_cw_variant_moves_on_log_prob_ensemble_and_differs_from_ce() -> None:
    ens = _linear_ensemble("log_mean_probs")
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = ens.predict(x)
    with torch.no_grad():
        assert (ens(x) <= 0).all()
    spec = AttackSpec(name="pgd", steps=10, alpha=0.05, random_start=False)
    adv_cw = run_attack(_ours(ens, spec, 0.3, "cw"), x, y, seed=0)
    adv_ce = run_attack(_ours(ens, spec, 0.3, "ce"), x, y, seed=0)
    moved = (adv_cw - x).flatten(1).abs().amax(1)
    assert (moved > 0).all() and (moved <= 0.3 + 1e-6).all()  # the margin loss pushes every example
    assert (ens.predict(adv_cw) != y).float().mean() > 0.9
    assert not torch.equal(adv_cw, adv_ce)


def test_cw_l2_on_log_probability_ensemble_masked_works_torchattacks_inert() -> None:
    """A unit test runs CW on an ensemble that outputs log-probabilities (all outputs ≤ 0)."""
    p = witness_problem(1.0, "L2", combine="log_mean_probs")
    verify_witness(p)
    target = p.ensemble.attack_target()
    with torch.no_grad():
        assert (target(p.x) <= 0).all()
    ours = run_attack(CWMasked(target, c=10, kappa=0, steps=100, lr=0.05), p.x, p.y, seed=0)
    theirs = run_attack(torchattacks.CW(target, c=10, kappa=0, steps=100, lr=0.05), p.x, p.y, seed=0)
    fooled_ours = p.ensemble.predict(ours) != p.y
    fooled_theirs = p.ensemble.predict(theirs) != p.y
    assert fooled_ours.all()
    assert ((ours - p.x).flatten(1).norm(dim=1) <= 1.0).all()  # within the eps where the witness lies
    assert not fooled_theirs.any()  # torchattacks' CW margin is zero on non-positive outputs: nothing moves


ALL_ATTACKS = [
    (AttackSpec(name="fgsm"), 0.2),
    (AttackSpec(name="bim", steps=10), 0.2),
    (AttackSpec(name="mim", steps=10), 0.2),
    (AttackSpec(name="pgd", steps=10), 0.2),
    (AttackSpec(name="pgd", steps=10, loss="cw"), 0.2),
    (AttackSpec(name="pgd", steps=10, losses=["ce", "cw"], restarts=2), 0.1),
    (AttackSpec(name="pgdl2", steps=10), 1.5),
    (AttackSpec(name="pgdl2", steps=10, loss="cw"), 1.5),
    (AttackSpec(name="cw", steps=100, c=10, lr=0.05), 1.5),
    (AttackSpec(name="square", n_queries=3000, restarts=2), 0.2),
    (AttackSpec(name="pgd", steps=10, loss="dlr"), 0.2),
    (AttackSpec(name="mora", steps=20), 0.2),
    (AttackSpec(name="mora", steps=20, loss="dlr", norm="L2"), 1.5),
    (AttackSpec(name="pgd", steps=10, losses=["vote", "softvote"]), 0.2),
    (AttackSpec(name="autoattack", version="standard"), 0.2),
    (AttackSpec(name="autoattack_port", version="standard"), 0.2),
    (AttackSpec(name="autoattack_port", version="standard", norm="L2"), 1.5),
]


@pytest.mark.parametrize("combine", ["log_mean_probs", "vote", "mean_logits"])
@pytest.mark.parametrize("spec,eps", ALL_ATTACKS, ids=[f"{attack_label(a)}@{e}" for a, e in ALL_ATTACKS])
def test_every_attack_finds_the_provable_adversarial(spec: AttackSpec, eps: float, combine: str) -> None:
    r = attack_unit_test(spec, eps, combine=combine)
    assert r["n"] >= 8
    assert r["missed"] == 0, r
    assert r["invalid"] == 0


def test_unit_test_fails_a_configuration_that_cannot_reach_eps() -> None:
    """The unit test can fail: 3 steps of 0.001 cannot travel to the closest adversarial at 0.45·eps = 0.09."""
    r = attack_unit_test(AttackSpec(name="pgd", steps=3, alpha=0.001, random_start=False), 0.2)
    assert r["missed"] == r["n"]


def test_witness_problem_geometry() -> None:
    for norm, eps in (("Linf", 0.3), ("L2", 2.0)):
        p = witness_problem(eps, norm)
        verify_witness(p)
        # the closest adversarial example is at 0.45·eps: a point at 0.44·eps along the witness direction is clean
        near = p.x + 0.44 / 0.4725 * (p.witness - p.x)
        assert (p.ensemble.predict(near) == p.y).all()


def test_sanitize_replaces_nan_and_projects() -> None:
    x = torch.full((3, 1, 2, 2), 0.5)
    adv = x.clone()
    adv[0, 0, 0, 0] = float("nan")
    adv[1] += 0.3  # outside an eps = 0.1 ball
    adv[2] += 0.05
    out, bad = sanitize(adv, x, 0.1, "Linf")
    assert bad.tolist() == [True, True, False]
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], x[1] + 0.1)
    assert torch.allclose(out[2], x[2] + 0.05)
    out2, bad2 = sanitize(x + 0.2, x, 0.4, "L2")  # L2 norm of 0.2 on 4 pixels = 0.4: on the sphere, valid
    assert not bad2.any() and torch.allclose(out2, x + 0.2)


def test_defaults_and_recorded_parameters() -> None:
    pgd = AttackSpec(name="pgd", eps=[0.2], steps=50)
    assert default_alpha(pgd, 0.2) == pytest.approx(0.05)
    assert default_alpha(AttackSpec(name="bim", steps=10), 0.2) == pytest.approx(0.02)
    assert default_alpha(AttackSpec(name="pgd", alpha_ratio=0.1, alpha=0.5), 0.3) == pytest.approx(0.03)
    p = resolved_params(AttackSpec(name="mim", steps=10, alpha_ratio=0.2, losses=["ce", "cw"], kappa=0.1), 0.25)
    assert p["alpha"] == pytest.approx(0.05) and p["momentum"] == 1.0 and p["kappa"] == 0.1
    assert p["losses"] == ["ce", "cw"] and p["norm"] == "Linf" and "torchattacks 3.5.1" in p["implementation"]
    assert "every iterate" in p["scoring"]
    assert resolved_params(AttackSpec(name="cw"), 1.0)["restarts"] == 1
    assert derive_seed(1, "a", 0.1) == derive_seed(1, "a", 0.1) != derive_seed(1, "a", 0.2)


def test_build_attack_types() -> None:
    ens = _linear_ensemble("log_mean_probs")
    pgd = build_attack(ens, AttackSpec(name="pgd"), 0.1, "cw", num_classes=4)
    assert isinstance(pgd, GradientAttack) and pgd.kind == "pgd" and pgd.reduction == "sum"
    assert build_attack(ens, AttackSpec(name="pgd"), 0.1, "ce", num_classes=4).reduction == "mean"
    assert isinstance(build_attack(ens, AttackSpec(name="mora"), 0.1, "dlr", num_classes=4), MoraAttack)
    assert type(build_attack(ens, AttackSpec(name="autoattack_port"), 0.1, "autoattack", num_classes=4)) \
        is torchattacks.AutoAttack
    assert isinstance(build_attack(ens, AttackSpec(name="cw"), 0.0, "cw", num_classes=4), CWMasked)
    sq = build_attack(ens, AttackSpec(name="square", loss="cw"), 0.1, "cw", num_classes=4, seed=3)
    assert isinstance(sq, torchattacks.Square) and sq.loss == "margin" and sq.seed == 3
