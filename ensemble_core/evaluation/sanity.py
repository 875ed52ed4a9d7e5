"""Attack unit tests in the sense of Zimmermann et al. 2022 ("Increasing Confidence in Adversarial
Robustness Evaluations"): a model built so that an adversarial example *provably* exists within eps,
which every configured attack must find.

The problem here is synthetic and small: an ensemble of members that share one linear decision
direction ``u`` (signs ±1 over ``d`` pixels) between class 0 and class 1, with different scales per
member, and eight further classes with constant, lower logits. Every test point sits at the same
margin, so that its closest adversarial example lies at ``0.45 · eps`` (L∞: along ``-u``; L2: along
``-u / ||u||``; 0.45 rather than 0.5 keeps the boundary off the lattice of ±eps pixel flips, where a tie
would count as robust). A *witness* at ``0.4725 · eps`` is checked to be misclassified by the deployed rule,
inside the ball and inside ``[0, 1]`` before any attack runs; an attack passes when it breaks every point.
The ensemble is exercised as deployed: log of mean probabilities (all outputs non-positive, the case
that defeats ``max((1 - onehot) · outputs)`` margins) or a vote attacked through its surrogate.

This is weaker than the paper's binarization test, which re-heads the real model's features; it still
catches inert losses, wrong signs, steps that cannot reach eps, eps in the wrong units and scoring on
the wrong rule. :func:`ensemble_core.evaluation.runner` runs it for every configured attack and eps and
raises the ``attack_failed_unit_test`` flag when an attack misses a witness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ensemble_core.ensemble import Ensemble, combine_rule
from ensemble_core.evaluation.attacks import (
    RANDOMISED,
    attack_losses,
    attack_norm,
    build_attack,
    derive_seed,
    run_scored,
    sanitize,
)
from ensemble_core.evaluation.objectives import VOTE_LOSSES
from ensemble_core.spec import AttackSpec

CLOSEST = 0.45  # distance of the closest adversarial example, as a fraction of eps


class LinearWitnessMember(nn.Module):
    """``z_0 = scale · (u·x − θ)``, ``z_1 = 0``, ``z_j = −(2 + j / 10)`` for the other classes."""

    def __init__(self, u: torch.Tensor, theta: float, scale: float, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("u", u.flatten().clone())
        self.theta, self.scale, self.num_classes = theta, scale, num_classes
        self.register_buffer("rest", -(2 + torch.arange(2, num_classes, dtype=torch.float32) / 10))
        self.dummy = nn.Parameter(torch.zeros(()))  # torchattacks reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z0 = self.scale * (x.flatten(1) @ self.u - self.theta) + 0 * self.dummy
        n = x.shape[0]
        return torch.cat([z0[:, None], torch.zeros(n, 1, device=x.device), self.rest.expand(n, -1)], 1)


@dataclass
class WitnessProblem:
    ensemble: Ensemble
    x: torch.Tensor
    y: torch.Tensor
    witness: torch.Tensor
    eps: float
    norm: str


def witness_problem(eps: float, norm: str = "Linf", *, n: int = 16, combine: str = "log_mean_probs",
                    members: int = 3, seed: int = 0, num_classes: int = 10) -> WitnessProblem:
    """Points whose closest adversarial example is at distance ``0.45 · eps`` (see the module docstring)."""
    if eps <= 0:
        raise ValueError("eps must be positive")
    g = torch.Generator().manual_seed(seed)
    # Images large enough that the L2 witness changes each pixel by at most 0.2.
    side = 8 if norm == "Linf" else max(8, math.ceil(eps / 0.4))
    d = side * side
    u = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()
    half = CLOSEST * eps
    # Per-pixel move of the closest adversarial example: L∞ half along -u; L2 half/sqrt(d) along -u.
    step = half if norm == "Linf" else half / math.sqrt(d)
    if step > 0.45:
        raise ValueError(f"eps {eps:g} is too large for a witness inside [0, 1] ({norm})")
    lo = min(0.5, 1.05 * step + 0.08)
    x = lo + (1 - 2 * lo) * torch.rand(n, d, generator=g)
    margin = half * (d if norm == "Linf" else math.sqrt(d))  # u·x − θ at every clean point
    s = x @ u
    theta = float(s.mean()) - margin
    # Move each point along u (the same small amount on every pixel) so that u·x − θ = margin exactly.
    x = x + ((theta + margin - s) / d)[:, None] * u[None, :]
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError(f"eps {eps:g}: could not place the witness points inside [0, 1]")
    # Member k's clean logit margin is 2^(k+1) whatever eps and d are, so no member saturates a softmax.
    ens = Ensemble([LinearWitnessMember(u, theta, 2.0 ** (k + 1) / margin, num_classes) for k in range(members)],
                   combine)
    ens.eval()
    y = torch.zeros(len(x), dtype=torch.long)
    direction = u if norm == "Linf" else u / math.sqrt(d)
    witness = (x - 1.05 * half * direction[None, :]).clamp(0, 1)
    img = (len(x), 1, side, side)
    return WitnessProblem(ens, x.view(img), y, witness.view(img), eps, norm)


def verify_witness(p: WitnessProblem) -> None:
    """The witness is inside the ball and ``[0, 1]``; the deployed rule is right on the clean point, wrong on it."""
    delta = (p.witness - p.x).flatten(1)
    dist = delta.abs().amax(1) if p.norm == "Linf" else delta.norm(dim=1)
    if not (dist <= p.eps + 1e-6).all():
        raise AssertionError(f"witness outside the eps-ball: max distance {float(dist.max()):.4g} > {p.eps:g}")
    if not ((p.witness >= 0) & (p.witness <= 1)).all():
        raise AssertionError("witness outside [0, 1]")
    if not (p.ensemble.predict(p.x) == p.y).all():
        raise AssertionError("a clean witness-problem point is misclassified")
    if (p.ensemble.predict(p.witness) == p.y).any():
        raise AssertionError("a witness is not adversarial under the deployed rule")


def attack_unit_test(spec: AttackSpec, eps: float, *, combine: str = "log_mean_probs", seed: int = 0,
                     n: int = 16) -> dict[str, object]:
    """Run ``spec`` at ``eps`` on a witness problem; ``missed`` counts points the attack did not break.

    Every loss of the entry runs (per-example worst case, as in an evaluation). A vote-aware loss on a
    ``combine`` that is not a vote is tested on the same problem deployed with a strict-majority ``vote``.
    Points count as broken when *any* iterate of an iterative attack is misclassified (best-iterate scoring).
    """
    norm = attack_norm(spec)
    problems: dict[str, WitnessProblem] = {}
    robust = torch.ones(n, dtype=torch.bool)
    restarts = spec.restarts if spec.name in RANDOMISED else 1
    invalid = 0
    used = []
    for loss in attack_losses(spec):
        rule = combine if loss not in VOTE_LOSSES or combine_rule(combine).vote is not None else "vote"
        if rule not in problems:
            problems[rule] = witness_problem(eps, norm, n=n, combine=rule, seed=seed)
            verify_witness(problems[rule])
        p = problems[rule]
        used.append(rule)
        target = p.ensemble.attack_target()
        for r in range(restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            s = derive_seed(seed, "unit-test", spec.name, eps, loss, r)
            atk = build_attack(target, spec, eps, loss, num_classes=10, seed=s, deployed=p.ensemble.rule)
            out = run_scored(atk, p.x[idx], p.y[idx], s, p.ensemble.rule.predict_labels)
            adv, bad = sanitize(out.adv, p.x[idx], None if spec.name == "cw" else eps, norm)
            invalid += int(bad.sum())
            fooled = p.ensemble.predict(adv) != p.y[idx]
            if spec.name == "cw":  # a minimal-perturbation attack must find it within eps
                fooled &= (adv - p.x[idx]).flatten(1).norm(dim=1) <= eps + 1e-6
            robust[idx] = ~fooled
    return {"attack": spec.name, "eps": eps, "norm": norm, "combine": combine, "rules": sorted(set(used)),
            "n": n, "missed": int(robust.sum()), "invalid": invalid, "closest_adversarial": CLOSEST * eps}
