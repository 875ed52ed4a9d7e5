"""The reviewer-grade attacks on constructed ensembles (docs/evaluation.md, "Adaptive attacks"):

* the DLR and vote-aware objectives, computed by hand;
* a vote ensemble on which log-mean-probabilities PGD provably never leaves the region where the vote is
  intact, broken by the vote-aware loss;
* the ensemble-aware attack (MORA-style reweighting) moving away from a member whose gradient dominates,
  breaking an ensemble where mean-logits PGD is provably trapped;
* best-iterate scoring: an example broken only at an intermediate PGD iterate counts as broken.

The constructed members see an image ``x`` only through one scalar ``s = u·(x − x0)/d`` (``u`` a ±1
pattern over the ``d`` pixels, ``x0`` the clean image, the same ``u·x0`` for every clean image): a signed
L∞ step of size α along ``±u`` moves ``s`` by exactly ``±α``, so each attack is a walk on a line whose
logits are known functions of ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ensemble_core.ensemble import Ensemble, VoteInfo, all_members, combine_rule
from ensemble_core.evaluation.attacks import build_attack, run_attack, run_scored
from ensemble_core.evaluation.engine import GradientAttack, MoraAttack
from ensemble_core.evaluation.objectives import (
    dlr_objective,
    make_objective,
    softvote_objective,
    vote_margins,
    vote_objective,
)
from ensemble_core.spec import AttackSpec

torch.set_num_threads(1)

EPS = 0.2
SIDE = 8
D = SIDE * SIDE


class ScalarMember(nn.Module):
    """Logits ``[f(s), 0, −10, …, −10]`` (10 classes; class 0 is the label), ``s = (u·x − θ) / (d · eps)``."""

    def __init__(self, u: torch.Tensor, theta: float, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("u", u)
        self.theta, self.f = theta, f
        self.dummy = nn.Parameter(torch.zeros(()))

    def s(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.u - self.theta) / (D * EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        z0 = self.f(self.s(x)) + 0 * self.dummy
        return torch.cat([z0[:, None], torch.zeros(n, 1), torch.full((n, 8), -10.0)], 1)


def line_problem(fs: list[Callable[[torch.Tensor], torch.Tensor]], combine: str, n: int = 16,
                 seed: int = 0) -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    """Clean images at ``s = 0`` (pixels in [0.3, 0.7], so the whole eps-ball stays inside [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.randint(0, 2, (D,), generator=g) * 2 - 1).float()
    x = 0.3 + 0.4 * torch.rand(n, D, generator=g)
    s = x @ u
    theta = float(s.mean())
    x = x + ((theta - s) / D)[:, None] * u[None, :]
    assert ((x >= 0.25) & (x <= 0.75)).all()
    ens = Ensemble([ScalarMember(u, theta, f) for f in fs], combine).eval()
    return ens, x.view(n, 1, SIDE, SIDE), torch.zeros(n, dtype=torch.long)


def s_of(ens: Ensemble, x: torch.Tensor) -> torch.Tensor:
    return ens.members[0].s(x)


# ------------------------------------------------------------------------------------- objectives


def test_dlr_by_hand_and_invariances() -> None:
    out = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    # row 0: -(3 - 1) / (3 - 0) = -2/3; row 1 (sorted 2, 1, 0): -(0 - 2) / (2 - 0) = 1
    assert dlr_objective(out, y).tolist() == pytest.approx([-2 / 3, 1.0])
    assert dlr_objective(5 * out - 7, y).tolist() == pytest.approx([-2 / 3, 1.0])  # shift and scale invariant
    with pytest.raises(ValueError, match="3 classes"):
        dlr_objective(out[:, :2], y)


def test_vote_margins_by_hand() -> None:
    # 3 voters, 4 classes, label 0
    z = torch.tensor([[[5.0, 1.0, 0.0, -1.0]], [[1.0, 3.0, 2.0, 0.0]], [[2.0, 2.5, 0.0, 0.0]]])
    y = torch.tensor([0])
    # majority (top-1): z_y - max other = 4, -2, -0.5; r = ceil(3/2) = 2
    m, r = vote_margins(z, y, VoteInfo(all_members, "majority"))
    assert r == 2 and m[:, 0].tolist() == pytest.approx([4.0, -2.0, -0.5])
    # boosted top-2: z_y - 2nd largest other = 5-0, 1-2, 2-0 → 5, -1, 2
    m, r = vote_margins(z, y, VoteInfo(all_members, "boosted", 2))
    assert r == 2 and m[:, 0].tolist() == pytest.approx([5.0, -1.0, 2.0])
    # plurality: target t = the runner-up of the summed softmax (class 1 here); margin = max_{j≠t} z_j − z_t
    m, r = vote_margins(z, y, VoteInfo(all_members, "plurality"))
    assert r == 2 and m[:, 0].tolist() == pytest.approx([4.0, -1.0, -0.5])
    # the objective: minus the two smallest hinge margins, clamped at -kappa
    assert vote_objective(z, y, VoteInfo(all_members, "majority"), kappa=0.0).item() == pytest.approx(0.0)
    assert vote_objective(z, y, VoteInfo(all_members, "majority"), kappa=1.0).item() == pytest.approx(1.5)
    zz = z.clone().requires_grad_(True)
    vote_objective(zz, y, VoteInfo(all_members, "boosted", 2), kappa=10.0).backward()
    # only the two smallest top-2 margins pull: voter 1 (-1) and voter 2 (2); voter 0 (5) gets no gradient
    assert zz.grad[0].abs().sum() == 0 and zz.grad[1].abs().sum() > 0 and zz.grad[2].abs().sum() > 0


def test_vote_objective_uses_the_rules_voters() -> None:
    rule = combine_rule("vote")
    assert rule.vote is not None and rule.vote.kind == "majority"
    import ensemble_core.methods.dkd  # noqa: F401  (registers DKD's rules)

    aux = combine_rule("boosted_vote_aux")
    assert aux.vote is not None and aux.vote.kind == "boosted" and aux.vote.top_n == 2
    z = torch.randn(4, 5, 10)
    assert torch.equal(aux.vote.voters(z), z[1:])  # DKD's auxiliaries: member 0 (M) does not vote
    with pytest.raises(ValueError, match="not a vote"):
        make_objective("vote", combine_rule("mean_logits"), combine_rule("mean_logits"))


def test_softvote_is_a_differentiable_vote() -> None:
    z = torch.tensor([[[4.0, 0.0, -1.0]], [[0.0, 4.0, -1.0]], [[0.0, 4.0, -1.0]]], requires_grad=True)
    y = torch.tensor([0])
    v = softvote_objective(z, y, VoteInfo(all_members, "majority"), temperature=0.25)
    assert v.item() > 0  # two of three voters vote class 1: the soft vote says the label lost
    v.sum().backward()
    assert z.grad.abs().sum() > 0


# ---------------------------------------------------------------- vote ensemble vs log-mean-probs PGD


def _vote_members() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    # member 0 always right on [-1, 1] (margin >= 0.1), its probability rising with s;
    # members 1 and 2 very confident at s <= 0, wrong for s > 0.5 and s > 0.55 (in units of eps).
    return [lambda s: 1.6 + 1.5 * s, lambda s: 40 * (0.5 - s), lambda s: 40 * (0.55 - s)]


def test_log_mean_probs_pgd_provably_fails_where_the_vote_aware_loss_breaks_the_vote() -> None:
    ens, x, y = line_problem(_vote_members(), "vote")
    assert (ens.predict(x) == y).all()
    # The proof, checked on a grid: on s in [-1, 0.3] (units of eps) the cross-entropy of the log of mean
    # probabilities *decreases* with s, so every signed ascent step moves s down (or leaves it at -1); the
    # random start of PGD lies below 0.3 here; the vote is intact for every s <= 0.5.
    s = torch.linspace(-1, 0.3, 261, dtype=torch.float64).requires_grad_(True)
    logits = torch.stack([torch.stack([f(s), torch.zeros_like(s)] + [torch.full_like(s, -10.0)] * 8, 1)
                          for f in _vote_members()])
    lmp = torch.logsumexp(logits.log_softmax(-1), 0) - math.log(3)
    (ds,) = torch.autograd.grad(-lmp[:, 0].sum(), s)
    assert (ds < 0).all()
    vote = combine_rule("vote").predict_labels(logits.detach().float())
    assert (vote == 0).all()

    lmp_pgd = AttackSpec(name="pgd", steps=100, alpha_ratio=0.25, restarts=1, random_start=True)
    target = ens.attack_target()
    assert target.combine == "log_mean_probs"
    for loss in ("ce", "cw"):
        atk = build_attack(target, lmp_pgd, EPS, loss, num_classes=10, deployed=ens.rule)
        out = run_scored(atk, x, y, 0, ens.rule.predict_labels)
        assert not out.broken.any(), loss  # no iterate of the whole walk breaks the vote
        assert (s_of(ens, out.final) < 0.31).all()
    vote_pgd = lmp_pgd.model_copy(update={"losses": ["vote"], "steps": 10})
    atk = build_attack(target, vote_pgd, EPS, "vote", num_classes=10, deployed=ens.rule)
    out = run_scored(atk, x, y, 0, ens.rule.predict_labels)
    assert out.broken.all()
    assert (ens.predict(out.adv) != y).all()
    assert ((out.adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all()


# ------------------------------------------------------------------- the ensemble-aware attack (MORA)


def _trap_members() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    # member 0: a bump rising steeply around s = 0.2 and falling around s = 0.8 (units of eps): its gradient
    # dominates the mean of logits on the rise; members 1 and 2 fall steadily with s.
    return [lambda s: 5 + 60 * (torch.tanh(4 * (s - 0.2)) - torch.tanh(4 * (s - 0.8))),
            lambda s: 20 - 40 * s, lambda s: 22 - 40 * s]


def test_mean_logits_pgd_is_trapped_and_the_ensemble_aware_attack_reweights_away_from_the_dominating_member() -> None:
    ens, x, y = line_problem(_trap_members(), "mean_logits")
    assert (ens.predict(x) == y).all()
    # A broken point exists: at s = 1 the mean logit of the label is below class 1's 0.
    s = torch.tensor([1.0])
    assert sum(f(s) for f in _trap_members()).item() < 0
    # The trap: the mean-logit margin increases with s on [-0.08, 0.41] (member 0's rise outweighs the others'
    # fall), decreases left of it; sign steps of 0.25 cannot cross the 0.49-wide basin, so PGD from s <= 0.3
    # oscillates around its left edge, inside [-0.35, 0.41], where the ensemble is right.
    grid = torch.linspace(-0.08, 0.41, 99, dtype=torch.float64).requires_grad_(True)
    (slope,) = torch.autograd.grad(sum(f(grid) for f in _trap_members()).sum(), grid)
    assert (slope > 0).all()
    wide = torch.linspace(-0.35, 0.45, 161)
    assert (sum(f(wide) for f in _trap_members()) > 0).all()

    pgd = AttackSpec(name="pgd", steps=100, alpha_ratio=0.25, random_start=True)
    for loss in ("ce", "cw", "dlr"):
        atk = build_attack(ens, pgd, EPS, loss, num_classes=10)
        out = run_scored(atk, x, y, 0, ens.rule.predict_labels)
        assert not out.broken.any(), loss

    # (cross-entropy saturates on these confident members: its gradient is exactly 0 in float32, so the
    # margin losses are the ones that show the reweighting)
    mora = build_attack(ens, AttackSpec(name="mora", steps=20), EPS, "dlr", num_classes=10)
    assert isinstance(mora, MoraAttack) and mora.mode == "logits"
    # The reweighting at the clean points: member 0's logit gradient is 3.4x the others' (134 vs 40 per unit
    # of s); its weight becomes inversely proportional to it...
    mora.direction(x, y)
    w = mora.last_weights
    assert w is not None and (w[0] < 0.5 * w[1]).all() and (w[0] < 0.5 * w[2]).all()
    # ... so the step follows the two members it outnumbers: +s, where plain PGD's first step goes -s.
    d = mora.direction(x, y)
    assert (s_of(ens, x + 0.01 * d.sign()) > 0).all()
    plain = build_attack(ens, pgd.model_copy(update={"steps": 1, "random_start": False}), EPS, "dlr",
                         num_classes=10)
    assert (s_of(ens, run_attack(plain, x, y, 0)) < 0).all()
    out = run_scored(mora, x, y, 0, ens.rule.predict_labels)
    assert out.broken.all()
    assert (ens.predict(out.adv) != y).all()
    assert ((out.adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all()


def test_mora_softmax_mode_attacks_only_the_members_still_standing() -> None:
    ens, x, y = line_problem([lambda s: 3 - 6 * s, lambda s: -1 + 0 * s, lambda s: 2 + s], "mean_probs")
    mora = build_attack(ens.attack_target(), AttackSpec(name="mora"), EPS, "ce", num_classes=10,
                        deployed=ens.rule)
    assert mora.mode == "softmax"
    mora.direction(x, y)
    w = mora.last_weights
    assert (w[1] == 0).all()  # member 1 is already fooled: not attacked
    assert (w[0] > 0).all() and (w[2] > 0).all()


# ------------------------------------------------------------------------------- best-iterate scoring


def test_best_iterate_scoring_catches_an_example_broken_only_at_an_intermediate_step() -> None:
    # One member (three copies), margin 2 - 40·exp(-((s - 0.52)/0.1)^2): wrong only near s = 0.52.
    bump: Callable[[torch.Tensor], torch.Tensor] = lambda s: 2 - 40 * torch.exp(-(((s - 0.52) / 0.1) ** 2))  # noqa: E731
    ens, x, y = line_problem([bump] * 3, "mean_logits")
    spec = AttackSpec(name="pgd", steps=3, alpha_ratio=0.3, random_start=False)
    atk = build_attack(ens, spec, EPS, "ce", num_classes=10)
    assert isinstance(atk, GradientAttack)
    out = run_scored(atk, x, y, 0, ens.rule.predict_labels)
    # the walk: s = 0 -> 0.3 -> 0.6 (inside the dip) -> 0.3; the final iterate is classified correctly
    assert torch.allclose(s_of(ens, out.final), torch.full((len(x),), 0.3), atol=1e-4)
    assert (ens.predict(out.final) == y).all()
    assert out.broken.all() and (out.broken_at == 2).all()
    assert torch.allclose(s_of(ens, out.adv), torch.full((len(x),), 0.6), atol=1e-4)
    assert (ens.predict(out.adv) != y).all()
    # scoring only the final iterate (what the evaluation did before) would call every example robust
    assert (ens.predict(run_attack(atk, x, y, 0)) == y).all()
