"""The iterative gradient attacks, one loop each, with **best-iterate scoring** on the deployed rule.

:class:`GradientAttack` runs FGSM, BIM, MIM (MI-FGSM), PGD (L∞) and PGD-L2 with any objective of
:mod:`ensemble_core.evaluation.objectives`. Its update rules are torchattacks 3.5.1's, operation for
operation (random start, step, projection and clipping in the same order), so with cross-entropy it
returns torchattacks' examples bit for bit (a unit test checks every attack); what it adds:

* the objective is any function of the members' logits (CW margin, DLR, the vote-aware losses), not only
  cross-entropy on the model's output;
* **every iterate is scored** on the deployed rule (``scorer``), from the very forward pass that gives the
  gradient (the members are deterministic in eval mode, so this costs nothing but the argmax), and the
  final iterate with one more forward; an example counts as broken if *any* iterate (the random start
  included) is misclassified, and :class:`Outcome` keeps that iterate as its adversarial example.

:class:`MoraAttack` is an ensemble-aware attack written from the MORA paper (Yu et al., "MORA: Improving
Ensemble Robustness Evaluation with Model-Reweighing Attack", NeurIPS 2022): its motivation is *gradient
domination* — one member whose input gradient is much larger than the others' decides the direction of
an attack on the ensemble's output, which can then stall in a local optimum of the average while the
other members could have been fooled. MORA re-weighs the members at every step; our version (docs/
evaluation.md, "The ensemble-aware attack") takes each member's own loss gradient, normalises it to unit
L2 norm per example (so a member's weight in the step is inversely proportional to its gradient's size,
recomputed at every step), and averages the normalised gradients over the *active* members: all members
for a logits ensemble; for softmax and vote ensembles only the members (voters) that still classify the
example correctly, so the attack spends its steps on the members that still stand. Steps follow APGD's
shape: signed (L∞) or normalised (L2) steps of size ``2ε·(1 − t/T)`` (linear decay, as MORA's
``decay_step='linear'``), heavy-ball momentum 0.75, a random start, best-iterate scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_core.evaluation.objectives import Objective, cw_objective, dlr_objective

MembersFn = Callable[[torch.Tensor], torch.Tensor]  # x -> (K, N, C) member logits
Scorer = Callable[[torch.Tensor], torch.Tensor]  # (K, N, C) member logits -> (N,) labels (-1 = abstain)

STEP_KINDS = ("fgsm", "bim", "mim", "pgd", "pgdl2")
MIM_ZERO_DIV = 1e-12  # MIM's floor on the mean |gradient| it divides by (cleverhans' avoid_zero_div)


@dataclass
class Outcome:
    """What one attack run found.

    ``adv``: per example, the first iterate the scorer misclassified, else the final iterate;
    ``broken``: whether some iterate was misclassified (``None`` without a scorer);
    ``broken_at``: the index of that iterate (0 = the starting point), ``-1`` if none;
    ``final``: the last iterate (what a plain attack returns).
    """

    adv: torch.Tensor
    final: torch.Tensor
    broken: torch.Tensor | None
    broken_at: torch.Tensor | None
    iterates: int


class _Tracker:
    """Keeps, per example, the first iterate that the scorer misclassifies."""

    def __init__(self, y: torch.Tensor, scorer: Scorer | None) -> None:
        self.y, self.scorer = y, scorer
        self.t = 0
        self.best: torch.Tensor | None = None
        self.broken = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        self.at = torch.full((len(y),), -1, dtype=torch.long, device=y.device)

    def see(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Score iterate ``x`` from its member logits ``z``."""
        if self.scorer is not None:
            new = (self.scorer(z.detach()) != self.y) & ~self.broken
            if new.any():
                if self.best is None:
                    self.best = x.detach().clone()
                self.best[new] = x.detach()[new]
                self.at[new] = self.t
                self.broken |= new
        self.t += 1

    def outcome(self, final: torch.Tensor, members: MembersFn) -> Outcome:
        final = final.detach()
        if self.scorer is None:
            return Outcome(final, final, None, None, self.t)
        with torch.no_grad():
            self.see(final, members(final))
        adv = final.clone()
        if self.best is not None:
            adv[self.broken] = self.best[self.broken]
        return Outcome(adv, final, self.broken.clone(), self.at.clone(), self.t)


class GradientAttack:
    """FGSM / BIM / MIM / PGD / PGD-L2 on ``objective(members(x), y)`` (see the module docstring).

    ``members``: ``x -> (K, N, C)`` member logits; ``objective``: per-example values to maximise;
    ``reduction``: ``mean`` (what torchattacks does with cross-entropy) or ``sum`` (every other loss). The
    instance is callable like a torchattacks attack (``atk(x, y)`` → the final iterate); :meth:`run`
    returns an :class:`Outcome` with best-iterate scoring.
    """

    def __init__(self, members: MembersFn, objective: Objective, *, kind: str, eps: float, alpha: float = 0.0,
                 steps: int = 1, random_start: bool = False, decay: float = 1.0, reduction: str = "sum") -> None:
        if kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {kind!r}; expected one of {', '.join(STEP_KINDS)}")
        self.members, self.objective, self.kind = members, objective, kind
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.decay, self.reduction = random_start, float(decay), reduction

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).final

    def _grad(self, adv: torch.Tensor, y: torch.Tensor, track: _Tracker) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        z = self.members(adv)
        track.see(adv, z)
        val = self.objective(z, y)
        cost = val.mean() if self.reduction == "mean" else val.sum()
        (g,) = torch.autograd.grad(cost, adv)
        return g

    def run(self, x: torch.Tensor, y: torch.Tensor, scorer: Scorer | None = None) -> Outcome:
        """Attack ``x`` (images in [0, 1]); score every iterate with ``scorer`` when given.

        One loop for every iterative kind: a start (:meth:`_start`), then ``steps`` times a gradient of the
        objective and the kind's update (:meth:`_step`), each as torchattacks writes it."""
        images = x.clone().detach()
        y = y.clone().detach()
        track = _Tracker(y, scorer)
        if self.kind == "fgsm":
            g = self._grad(images, y, track)
            return track.outcome(torch.clamp(images + self.eps * g.sign(), min=0, max=1), self.members)
        adv = self._start(images)
        momentum = torch.zeros_like(images)  # MIM's; the other kinds pass it through
        for _ in range(self.steps):
            adv, momentum = self._step(adv, images, self._grad(adv, y, track), momentum)
        return track.outcome(adv, self.members)

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        """The first iterate: the images (BIM and MIM: torchattacks has no random start for them), or a uniform
        draw in the L∞ ball (PGD) / a radius-uniform draw in the L2 ball (PGD-L2) with ``random_start``."""
        adv = images.clone()
        if not self.random_start or self.kind in ("bim", "mim"):
            return adv
        eps = self.eps
        if self.kind == "pgd":
            return torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), min=0, max=1).detach()
        n = len(images)  # pgdl2
        delta = torch.empty_like(adv).normal_()
        norms = delta.view(n, -1).norm(p=2, dim=1).view(n, 1, 1, 1)
        r = torch.zeros_like(norms).uniform_(0, 1)
        delta *= r / norms * eps
        return torch.clamp(adv + delta, min=0, max=1).detach()

    def _step(self, adv: torch.Tensor, images: torch.Tensor, g: torch.Tensor,
              momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of ``adv`` along the gradient ``g``, projected as the kind's torchattacks class does;
        returns the new iterate and the momentum (changed by MIM only)."""
        eps, alpha = self.eps, self.alpha
        if self.kind == "bim":  # torchattacks' BIM: its projection in its order
            step = adv + alpha * g.sign()
            a = torch.clamp(images - eps, min=0)
            b = (step >= a).float() * step + (step < a).float() * a
            c = (b > images + eps).float() * (images + eps) + (b <= images + eps).float() * b
            return torch.clamp(c, max=1).detach(), momentum
        if self.kind == "mim":  # torchattacks' MIFGSM: momentum on L1-normalised gradients ...
            # ... with the zero-gradient guard of cleverhans' MomentumIterativeMethod (avoid_zero_div 1e-12): an
            # example whose gradient is all zero (a capped loss, e.g. the CW margin at κ) adds nothing and keeps
            # moving along its momentum. torchattacks divides 0 by 0: the momentum turns NaN for good, sign(NaN)
            # is 0, and the example stops where it first reached κ (docs/evaluation.md, "MIM and zero gradients").
            g = g / torch.mean(torch.abs(g), dim=(1, 2, 3), keepdim=True).clamp_min(MIM_ZERO_DIV)
            g = g + momentum * self.decay
            adv = adv.detach() + alpha * g.sign()
            delta = torch.clamp(adv - images, min=-eps, max=eps)
            return torch.clamp(images + delta, min=0, max=1).detach(), g
        if self.kind == "pgd":  # torchattacks' PGD
            adv = adv.detach() + alpha * g.sign()
            delta = torch.clamp(adv - images, min=-eps, max=eps)
            return torch.clamp(images + delta, min=0, max=1).detach(), momentum
        # pgdl2: torchattacks' PGDL2 (L2-normalised steps with its 1e-10 guard, projection onto the L2 ball)
        n = len(images)
        g = g / (torch.norm(g.view(n, -1), p=2, dim=1) + 1e-10).view(n, 1, 1, 1)
        adv = adv.detach() + alpha * g
        delta = adv - images
        delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
        factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
        return torch.clamp(images + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach(), momentum


def member_loss(loss: str, z: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per-example loss of one member's logits ``z`` ``(N, C)``, to maximise (``ce``, ``cw`` or ``dlr``)."""
    if loss == "ce":
        return F.cross_entropy(z, y, reduction="none")
    if loss == "cw":
        return cw_objective(z, y, kappa)
    if loss == "dlr":
        return dlr_objective(z, y)
    raise ValueError(f"losses: the ensemble-aware attack takes ce, cw or dlr, not {loss!r}")


MORA_MODES = ("logits", "softmax", "vote")


def mora_mode_for(outputs: str) -> str:
    """The ensemble pattern of a deployed rule: ``logits``, ``softmax`` (probabilities) or ``vote``."""
    return {"logits": "logits", "probs": "softmax", "log_probs": "softmax", "votes": "vote"}.get(outputs, "softmax")


class MoraAttack:
    """The ensemble-aware, member-reweighing attack (module docstring; docs/evaluation.md).

    ``members``: the ensemble's members (modules returning logits); ``voters``: indices of the members the
    deployed rule listens to (all by default; DKD's auxiliary vote leaves out member 0); ``mode``:
    ``logits`` (every voter is attacked at every step), ``softmax`` or ``vote`` (only the voters that
    still classify the example correctly, or, with ``top_n`` > 1 (DKD's boosted vote), still have ``y`` among
    their top-n classes). ``last_weights`` holds, after each step, every member's
    effective weight ``active_k / (|active| · ‖∇ℓ_k‖)`` ``(K, N)``.
    """

    def __init__(self, members: Sequence[nn.Module], *, loss: str = "ce", eps: float, steps: int = 100,
                 norm: str = "Linf", mode: str = "softmax", voters: Sequence[int] | None = None,
                 top_n: int = 1, random_start: bool = True, momentum: float = 0.75, kappa: float = 0.0) -> None:
        if mode not in MORA_MODES:
            raise ValueError(f"mora_mode: expected one of {', '.join(MORA_MODES)}, got {mode!r}")
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm: expected Linf or L2, got {norm!r}")
        self.members = list(members)
        self.voters = list(voters) if voters is not None else list(range(len(self.members)))
        self.loss, self.eps, self.steps, self.norm, self.mode = loss, float(eps), int(steps), norm, mode
        self.random_start, self.momentum, self.kappa = random_start, float(momentum), float(kappa)
        self.top_n = max(1, int(top_n))
        self.last_weights: torch.Tensor | None = None

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).final

    def _project(self, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return torch.clamp(torch.min(torch.max(adv, x - self.eps), x + self.eps), 0.0, 1.0)
        n = len(x)
        delta = adv - x
        norms = delta.view(n, -1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(self.eps / norms, max=1.0).view(n, *[1] * (x.dim() - 1))
        return torch.clamp(x + delta * factor, 0.0, 1.0)

    def direction(self, adv: torch.Tensor, y: torch.Tensor, track: _Tracker | None = None) -> torch.Tensor:
        """The reweighted ascent direction at ``adv``: mean over active voters of unit-norm loss gradients."""
        adv = adv.detach().requires_grad_(True)
        outs = [m(adv) for m in self.members]
        if track is not None:
            track.see(adv, torch.stack([o.detach() for o in outs]))
        n = len(adv)
        flat = [1] * (adv.dim() - 1)
        total = torch.zeros_like(adv)
        weights = torch.zeros(len(self.members), n, device=adv.device)
        grads, norms, active = [], [], []
        for k in self.voters:
            (g,) = torch.autograd.grad(member_loss(self.loss, outs[k], y, self.kappa).sum(), adv,
                                       retain_graph=k != self.voters[-1])
            grads.append(g)
            norms.append(g.view(n, -1).norm(dim=1))
            top = outs[k].detach().topk(min(self.top_n, outs[k].shape[1]), dim=1).indices
            correct = (top == y[:, None]).any(1)  # the voter still votes for y (top-n for a boosted vote)
            active.append(correct if self.mode in ("softmax", "vote") else torch.ones_like(correct))
        act = torch.stack(active).float()  # (V, N)
        act = torch.where(act.sum(0, keepdim=True) > 0, act, torch.ones_like(act))  # none standing: all voters
        count = act.sum(0)
        for i, k in enumerate(self.voters):
            w = act[i] / (count * (norms[i] + 1e-12))
            w = torch.where(norms[i] > 0, w, torch.zeros_like(w))
            weights[k] = w
            total = total + grads[i] * w.view(n, *flat)
        self.last_weights = weights
        return total

    def run(self, x: torch.Tensor, y: torch.Tensor, scorer: Scorer | None = None) -> Outcome:
        x = x.clone().detach()
        y = y.clone().detach()
        track = _Tracker(y, scorer)
        n = len(x)
        flat = [1] * (x.dim() - 1)
        adv = x.clone()
        if self.random_start:
            if self.norm == "Linf":
                adv = x + torch.empty_like(x).uniform_(-self.eps, self.eps)
            else:
                d = torch.empty_like(x).normal_()
                d = d / d.view(n, -1).norm(dim=1).clamp_min(1e-12).view(n, *flat)
                adv = x + d * self.eps * torch.rand(n, device=x.device).view(n, *flat)
            adv = self._project(adv, x).detach()
        prev = adv.clone()
        for t in range(self.steps):
            g = self.direction(adv, y, track)
            eta = 2 * self.eps * (1 - t / self.steps)
            unit = g / g.view(n, -1).norm(dim=1).clamp_min(1e-12).view(n, *flat)
            step = g.sign() if self.norm == "Linf" else unit
            z1 = self._project(adv + eta * step, x)
            a = self.momentum if t > 0 else 1.0
            nxt = self._project(adv + a * (z1 - adv) + (1 - a) * (adv - prev), x)
            prev, adv = adv, nxt.detach()
        return track.outcome(adv, self.member_logits)
