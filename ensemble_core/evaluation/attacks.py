"""Evaluation attacks through torchattacks, with the project's conventions.

Conventions (docs/evaluation.md):

* Inputs are images in ``[0, 1]``; normalisation lives inside every member, so no attack normalises.
* Attacks are untargeted and run on the ensemble's *attack target* (``Ensemble.attack_target()``: the
  deployed rule when it is differentiable, otherwise its stated differentiable surrogate). The
  adversarial examples are then scored on the *deployed* rule by the runner.
* Cross-entropy variants are torchattacks' own classes, unchanged (FGSM, BIM, MIFGSM, PGD, PGDL2,
  Square, AutoAttack). torchattacks hard-codes cross-entropy inside those attacks, so the CW-margin
  variants are small subclasses here that override ``forward`` with the same update rule and the CW
  margin of :func:`cw_objective` in place of the cross-entropy (a unit test checks that each subclass,
  run with cross-entropy, reproduces torchattacks' output exactly). torchattacks' own CW-L2 computes
  its margin as ``max((1 - onehot) * outputs)``, which is inert when every output is non-positive (log
  of mean probabilities); :class:`CWMasked` masks the true class with ``-inf`` instead.
* Every attack call runs under its own seed (``torch.random.fork_rng`` + ``manual_seed``), so results
  do not depend on what ran before, on the batch order or on how examples are sharded.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from ensemble_core.spec import AttackSpec

TORCHATTACKS_VERSION = getattr(torchattacks, "__version__", "unknown")

FIXED_NORMS = {"fgsm": "Linf", "bim": "Linf", "mim": "Linf", "pgd": "Linf", "pgdl2": "L2", "cw": "L2"}
GRADIENT_FREE = frozenset({"square"})
MINIMAL_PERTURBATION = frozenset({"cw"})  # one run gives a distance per example, scored at every eps
RANDOMISED = frozenset({"pgd", "pgdl2", "square", "autoattack"})  # restarts draw new random starts


def attack_norm(spec: AttackSpec) -> str:
    """``Linf`` or ``L2``: fixed for most attacks, ``spec.norm`` (default Linf) for square / autoattack."""
    return FIXED_NORMS.get(spec.name) or spec.norm or "Linf"


def attack_losses(spec: AttackSpec) -> list[str]:
    """The losses an attack entry runs (per-example worst case over them); CW-L2 and AutoAttack have their own."""
    if spec.name == "autoattack":
        return ["autoattack"]
    if spec.name == "cw":
        return ["cw"]
    return list(dict.fromkeys(spec.losses or [spec.loss]))


def attack_label(spec: AttackSpec) -> str:
    """A short, unique-enough name for tables, e.g. ``pgd-40x5 (ce+cw)``."""
    if spec.label:
        return spec.label
    name = spec.name
    if spec.name in ("bim", "mim", "pgd", "pgdl2", "cw"):
        name += f"-{spec.steps}"
    if spec.restarts > 1:
        name += f"x{spec.restarts}"
    if spec.name == "square":
        name += f"-{spec.n_queries}q"
    if spec.name in ("square", "autoattack") and attack_norm(spec) != "Linf":
        name += f"-{attack_norm(spec)}"
    if spec.name == "autoattack":
        return f"{name}-{spec.version}"
    losses = attack_losses(spec)
    if losses != ["ce"] and spec.name != "cw":
        name += f" ({'+'.join(losses)})"
    return name


def default_alpha(spec: AttackSpec, eps: float) -> float:
    """Step size: ``alpha_ratio``·eps, else ``alpha``, else eps/4 (pgd / pgdl2) or eps/steps (bim / mim)."""
    if spec.alpha_ratio is not None:
        return spec.alpha_ratio * eps
    if spec.alpha is not None:
        return spec.alpha
    if spec.name in ("pgd", "pgdl2"):
        return eps / 4
    return eps / spec.steps


def resolved_params(spec: AttackSpec, eps: float | None) -> dict[str, Any]:
    """Every parameter the attack actually runs with (recorded with each result)."""
    p: dict[str, Any] = {"name": spec.name, "label": attack_label(spec), "norm": attack_norm(spec),
                         "targeted": False, "restarts": spec.restarts, "losses": attack_losses(spec)}
    if eps is not None:
        p["eps"] = eps
    if spec.name == "fgsm":
        p.update(steps=1, alpha=eps)
    elif spec.name in ("bim", "mim", "pgd", "pgdl2"):
        p.update(steps=spec.steps, alpha=default_alpha(spec, eps) if eps is not None else spec.alpha,
                 random_start=spec.random_start if spec.name in ("pgd", "pgdl2") else False)
        if spec.name == "mim":
            p["momentum"] = spec.momentum
    elif spec.name == "cw":
        p.update(steps=spec.steps, c=spec.c, lr=spec.lr, kappa=spec.kappa, restarts=1,
                 note="minimal-perturbation L2 attack: an example counts as broken at eps when CW found an "
                      "adversarial example with L2 distance <= eps")
    elif spec.name == "square":
        p.update(n_queries=spec.n_queries, p_init=0.8, square_loss="margin" if attack_losses(spec) == ["cw"] else
                 "ce" if attack_losses(spec) == ["ce"] else "ce+margin")
    elif spec.name == "autoattack":
        p.update(version=spec.version, components={
            "standard": "apgd-ce, apgd-t (dlr), fab-t, square (5000 queries)",
            "plus": "apgd-ce, apgd-dlr, fab, square (5000 queries), apgd-t, fab-t",
            "rand": "apgd-ce, apgd-dlr with 20 EoT iterations"}[spec.version])
    if "cw" in attack_losses(spec) and spec.name not in ("cw", "square"):
        p["kappa"] = spec.kappa
    p["implementation"] = implementation_name(spec)
    return p


def implementation_name(spec: AttackSpec) -> str:
    losses = attack_losses(spec)
    base = {"fgsm": "FGSM", "bim": "BIM", "mim": "MIFGSM", "pgd": "PGD", "pgdl2": "PGDL2", "cw": "CW",
            "square": "Square", "autoattack": "AutoAttack"}[spec.name]
    parts = []
    if "ce" in losses or spec.name in ("square", "autoattack"):
        parts.append(f"torchattacks {TORCHATTACKS_VERSION} {base}")
    if "cw" in losses and spec.name not in ("square",):
        ours = "CWMasked" if spec.name == "cw" else f"{base}Margin"
        parts.append(f"ensemble_core.evaluation.attacks.{ours} (torchattacks.{base} with the masked CW margin)")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ losses


def cw_objective(outputs: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per-sample CW objective to *maximise*: ``min(max_{j≠y} o_j − o_y, κ)`` (Carlini & Wagner's f6, negated).

    The true class is masked with ``-inf`` before the max, so the margin is right when every output is
    non-positive (log of mean probabilities), where ``max((1 − onehot)·o)`` would select a masked zero.
    It is capped at ``κ``: once an example is misclassified with confidence ``κ`` it stops pulling.
    """
    true = outputs.gather(1, y[:, None]).squeeze(1)
    other = outputs.masked_fill(F.one_hot(y, outputs.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa)


class _MarginMixin:
    """Shared by the CW-margin variants: the summed objective replaces torchattacks' mean cross-entropy."""

    kappa: float
    loss_name: str

    def _cost(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "ce":
            return F.cross_entropy(outputs, labels)
        return cw_objective(outputs, labels, self.kappa).sum()


class FGSMMargin(_MarginMixin, torchattacks.FGSM):
    """torchattacks.FGSM with a selectable loss (``cw``: the masked CW margin)."""

    def __init__(self, model: nn.Module, eps: float, kappa: float = 0.0, loss: str = "cw") -> None:
        super().__init__(model, eps=eps)
        self.kappa, self.loss_name = kappa, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        images.requires_grad_(True)
        (grad,) = torch.autograd.grad(self._cost(self.get_logits(images), labels), images)
        return torch.clamp(images + self.eps * grad.sign(), min=0, max=1).detach()


class BIMMargin(_MarginMixin, torchattacks.BIM):
    """torchattacks.BIM (no random start, projected signed steps) with a selectable loss."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, kappa: float = 0.0,
                 loss: str = "cw") -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps)
        self.kappa, self.loss_name = kappa, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        ori = images.clone().detach()
        for _ in range(self.steps):
            images.requires_grad_(True)
            (grad,) = torch.autograd.grad(self._cost(self.get_logits(images), labels), images)
            adv = images + self.alpha * grad.sign()
            # torchattacks' BIM projection: onto [x - eps, x + eps] ∩ [0, 1], in the same order.
            a = torch.clamp(ori - self.eps, min=0)
            b = (adv >= a).float() * adv + (adv < a).float() * a
            c = (b > ori + self.eps).float() * (ori + self.eps) + (b <= ori + self.eps).float() * b
            images = torch.clamp(c, max=1).detach()
        return images


class MIFGSMMargin(_MarginMixin, torchattacks.MIFGSM):
    """torchattacks.MIFGSM (momentum on L1-normalised gradients) with a selectable loss."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, decay: float = 1.0,
                 kappa: float = 0.0, loss: str = "cw") -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, decay=decay)
        self.kappa, self.loss_name = kappa, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        momentum = torch.zeros_like(images)
        adv = images.clone().detach()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(self._cost(self.get_logits(adv), labels), adv)
            grad = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
            grad = grad + momentum * self.decay
            momentum = grad
            adv = adv.detach() + self.alpha * grad.sign()
            delta = torch.clamp(adv - images, min=-self.eps, max=self.eps)
            adv = torch.clamp(images + delta, min=0, max=1).detach()
        return adv


class PGDMargin(_MarginMixin, torchattacks.PGD):
    """torchattacks.PGD (L∞, uniform random start) with a selectable loss."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, random_start: bool = True,
                 kappa: float = 0.0, loss: str = "cw") -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.kappa, self.loss_name = kappa, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone().detach()
        if self.random_start:
            adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-self.eps, self.eps), min=0, max=1).detach()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(self._cost(self.get_logits(adv), labels), adv)
            adv = adv.detach() + self.alpha * grad.sign()
            delta = torch.clamp(adv - images, min=-self.eps, max=self.eps)
            adv = torch.clamp(images + delta, min=0, max=1).detach()
        return adv


class PGDL2Margin(_MarginMixin, torchattacks.PGDL2):
    """torchattacks.PGDL2 (L2-normalised steps, random start in the L2 ball) with a selectable loss."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, random_start: bool = True,
                 kappa: float = 0.0, loss: str = "cw") -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.kappa, self.loss_name = kappa, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone().detach()
        n = len(images)
        if self.random_start:
            delta = torch.empty_like(adv).normal_()
            norms = delta.view(n, -1).norm(p=2, dim=1).view(n, 1, 1, 1)
            r = torch.zeros_like(norms).uniform_(0, 1)
            delta *= r / norms * self.eps
            adv = torch.clamp(adv + delta, min=0, max=1).detach()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(self._cost(self.get_logits(adv), labels), adv)
            grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + self.eps_for_division
            grad = grad / grad_norms.view(n, 1, 1, 1)
            adv = adv.detach() + self.alpha * grad
            delta = adv - images
            delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
            factor = torch.min(self.eps / delta_norms, torch.ones_like(delta_norms))
            adv = torch.clamp(images + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach()
        return adv


class CWMasked(torchattacks.CW):
    """torchattacks.CW (L2) whose margin masks the true class with ``-inf`` (works on non-positive outputs)."""

    def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, outputs.shape[1]).bool()
        real = outputs.gather(1, labels[:, None]).squeeze(1)
        other = outputs.masked_fill(onehot, float("-inf")).amax(1)
        if self.targeted:
            return torch.clamp(other - real, min=-self.kappa)
        return torch.clamp(real - other, min=-self.kappa)


# --------------------------------------------------------------------------------------- factory


def build_attack(model: nn.Module, spec: AttackSpec, eps: float, loss: str, *, num_classes: int,
                 seed: int = 0) -> torchattacks.Attack:
    """One torchattacks ``Attack`` for ``spec`` at ``eps`` with ``loss`` (``ce``, ``cw`` or the attack's own)."""
    if spec.name == "fgsm":
        return torchattacks.FGSM(model, eps=eps) if loss == "ce" else FGSMMargin(model, eps, spec.kappa)
    alpha = default_alpha(spec, eps)
    if spec.name == "bim":
        return (torchattacks.BIM(model, eps=eps, alpha=alpha, steps=spec.steps) if loss == "ce"
                else BIMMargin(model, eps, alpha, spec.steps, spec.kappa))
    if spec.name == "mim":
        return (torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=spec.steps, decay=spec.momentum)
                if loss == "ce" else MIFGSMMargin(model, eps, alpha, spec.steps, spec.momentum, spec.kappa))
    if spec.name == "pgd":
        return (torchattacks.PGD(model, eps=eps, alpha=alpha, steps=spec.steps, random_start=spec.random_start)
                if loss == "ce" else PGDMargin(model, eps, alpha, spec.steps, spec.random_start, spec.kappa))
    if spec.name == "pgdl2":
        return (torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=spec.steps, random_start=spec.random_start)
                if loss == "ce" else PGDL2Margin(model, eps, alpha, spec.steps, spec.random_start, spec.kappa))
    if spec.name == "cw":
        return CWMasked(model, c=spec.c, kappa=spec.kappa, steps=spec.steps, lr=spec.lr)
    if spec.name == "square":
        return torchattacks.Square(model, norm=attack_norm(spec), eps=eps, n_queries=spec.n_queries, n_restarts=1,
                                   loss="margin" if loss == "cw" else "ce", seed=seed % (2**31), verbose=False)
    if spec.name == "autoattack":
        return torchattacks.AutoAttack(model, norm=attack_norm(spec), eps=eps, version=spec.version,
                                       n_classes=num_classes, seed=seed % (2**31), verbose=False)
    raise ValueError(f"attacks.name: unknown attack {spec.name!r}")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block under ``seed`` without disturbing the caller's random state."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_attack(atk: torchattacks.Attack, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """``atk(x, y)`` under ``seed``; returns detached adversarial examples on ``x``'s device."""
    with seeded(seed, x.device):
        return atk(x, y).detach()


def sanitize(adv: torch.Tensor, x: torch.Tensor, eps: float | None, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``adv`` into the threat model; rows with non-finite values fall back to ``x``.

    Returns the sanitised examples and a bool mask of rows that were invalid (non-finite, or more than
    a rounding error outside the eps-ball or ``[0, 1]``): an attack that returns such rows is counted,
    never credited with them.
    """
    finite = torch.isfinite(adv).flatten(1).all(1)
    adv = torch.where(finite.view(-1, *[1] * (adv.dim() - 1)), adv, x)
    delta = adv - x
    n = len(x)
    outside = (adv < -1e-6).flatten(1).any(1) | (adv > 1 + 1e-6).flatten(1).any(1)
    if eps is not None:
        if norm == "Linf":
            outside |= delta.abs().flatten(1).amax(1) > eps + 1e-5
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(dim=1)
            outside |= norms > eps * (1 + 1e-4) + 1e-6
            delta = delta * torch.clamp(eps / norms.clamp_min(1e-12), max=1.0).view(n, *[1] * (adv.dim() - 1))
    return (x + delta).clamp(0, 1), ~finite | outside
