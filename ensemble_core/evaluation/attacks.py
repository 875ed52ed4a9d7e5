"""Evaluation attacks: the project's iterative loops, torchattacks, and the reference AutoAttack.

Conventions (docs/evaluation.md):

* Inputs are images in ``[0, 1]``; normalisation lives inside every member, so no attack normalises.
* Attacks are untargeted and differentiate the ensemble's *attack target* (``Ensemble.attack_target()``:
  the deployed rule when it is differentiable, otherwise its stated differentiable view); the examples are
  scored on the *deployed* rule. The vote-aware losses (``vote``, ``softvote``) and the ensemble-aware
  attack (``mora``) read the deployed rule itself (its voters and how they decide).
* FGSM, BIM, MIM, PGD and PGD-L2 run in :mod:`ensemble_core.evaluation.engine`: one loop each, torchattacks'
  update rules operation for operation (a unit test checks that with cross-entropy they return torchattacks'
  examples bit for bit), any objective of :mod:`ensemble_core.evaluation.objectives`, and **every iterate
  scored on the deployed rule** (an example is broken if any iterate breaks it).
* CW-L2 (:class:`CWMasked`, torchattacks' CW with a margin that masks the true class with ``-inf``), Square
  and torchattacks' AutoAttack port (``autoattack_port``) are torchattacks'; ``autoattack`` is the
  reference AutoAttack (PyPI ``pyautoattack``, by its authors) through
  :mod:`ensemble_core.evaluation.reference_autoattack`. Their final examples are scored on the deployed rule.
* Every attack call runs under its own seed (``torch.random.fork_rng`` + ``manual_seed``), so results
  do not depend on what ran before, on the batch order or on how examples are sharded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from ensemble_core.ensemble import CombineRule, Ensemble, combine_rule
from ensemble_core.evaluation.engine import GradientAttack, MoraAttack, Outcome, Scorer, mora_mode_for
from ensemble_core.evaluation.objectives import VOTE_LOSSES, applicable, cw_objective, make_objective
from ensemble_core.spec import AttackSpec

__all__ = ["CWMasked", "GradientAttack", "MoraAttack", "attack_label", "attack_losses", "attack_norm",
           "build_attack", "cw_objective", "default_alpha", "derive_seed", "resolved_params", "run_attack",
           "run_scored", "sanitize"]

TORCHATTACKS_VERSION = getattr(torchattacks, "__version__", "unknown")

FIXED_NORMS = {"fgsm": "Linf", "bim": "Linf", "mim": "Linf", "pgd": "Linf", "pgdl2": "L2", "cw": "L2"}
GRADIENT_FREE = frozenset({"square"})
MINIMAL_PERTURBATION = frozenset({"cw"})  # one run gives a distance per example, scored at every eps
RANDOMISED = frozenset({"pgd", "pgdl2", "square", "mora", "autoattack", "autoattack_port"})  # restarts: new starts
ITERATIVE = frozenset({"fgsm", "bim", "mim", "pgd", "pgdl2"})  # our engine's loops (best-iterate scoring)
OWN_LOSS = {"autoattack": "autoattack", "autoattack_port": "autoattack", "cw": "cw"}


def attack_norm(spec: AttackSpec) -> str:
    """``Linf`` or ``L2``: fixed for most attacks, ``spec.norm`` (default Linf) for square / mora / autoattack."""
    return FIXED_NORMS.get(spec.name) or spec.norm or "Linf"


def attack_losses(spec: AttackSpec, deployed: CombineRule | None = None) -> list[str]:
    """The losses an attack entry runs (per-example worst case over them); CW-L2 and AutoAttack have their own.

    With ``deployed``, the losses that do not apply to that rule (the vote-aware losses on a rule that is not
    a vote) are left out.
    """
    if spec.name in OWN_LOSS:
        return [OWN_LOSS[spec.name]]
    losses = list(dict.fromkeys(spec.losses or [spec.loss]))
    if deployed is not None:
        losses = [loss for loss in losses if applicable(loss, deployed)]
    return losses


def attack_label(spec: AttackSpec) -> str:
    """A short, unique-enough name for tables, e.g. ``pgd-40x5 (ce+cw)``."""
    if spec.label:
        return spec.label
    name = spec.name
    if spec.name in ("bim", "mim", "pgd", "pgdl2", "cw", "mora"):
        name += f"-{spec.steps}"
    if spec.restarts > 1:
        name += f"x{spec.restarts}"
    if spec.name == "square":
        name += f"-{spec.n_queries}q"
    if spec.name in ("square", "mora", "autoattack", "autoattack_port") and attack_norm(spec) != "Linf":
        name += f"-{attack_norm(spec)}"
    if spec.name in ("autoattack", "autoattack_port"):
        return f"{name}-{spec.version}"
    if spec.name == "mora" and spec.mora_mode != "auto":
        name += f"-{spec.mora_mode}"
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


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


PYAUTOATTACK_VERSION = _dist_version("pyautoattack")
REFERENCE_COMPONENTS = {
    "standard": "apgd-ce (100 iterations, 1 restart), apgd-t (targeted DLR, 100 iterations, 9 target classes), "
                "fab-t (100 iterations, 9 target classes), square (5000 queries); each on the points the previous "
                "left robust",
    "plus": "apgd-ce, apgd-dlr (100 iterations, 5 restarts), fab (5 restarts), square (5000 queries, 5 restarts), "
            "apgd-t, fab-t (9 target classes)",
    "rand": "apgd-ce, apgd-dlr (100 iterations, 20 EoT iterations)"}
PORT_COMPONENTS = {"standard": "apgd-ce, apgd-t (dlr), fab-t, square (5000 queries)",
                   "plus": "apgd-ce, apgd-dlr, fab, square (5000 queries), apgd-t, fab-t",
                   "rand": "apgd-ce, apgd-dlr with 20 EoT iterations"}


def resolved_params(spec: AttackSpec, eps: float | None) -> dict[str, Any]:
    """Every parameter the attack actually runs with (recorded with each result)."""
    p: dict[str, Any] = {"name": spec.name, "label": attack_label(spec), "norm": attack_norm(spec),
                         "targeted": False, "restarts": spec.restarts, "losses": attack_losses(spec)}
    if eps is not None:
        p["eps"] = eps
    if spec.name in ITERATIVE:
        p["scoring"] = "every iterate on the deployed rule (broken if any iterate is misclassified)"
    if spec.name == "fgsm":
        p.update(steps=1, alpha=eps)
    elif spec.name in ("bim", "mim", "pgd", "pgdl2"):
        p.update(steps=spec.steps, alpha=default_alpha(spec, eps) if eps is not None else spec.alpha,
                 random_start=spec.random_start if spec.name in ("pgd", "pgdl2") else False)
        if spec.name == "mim":
            p["momentum"] = spec.momentum
    elif spec.name == "mora":
        p.update(steps=spec.steps, mode=spec.mora_mode, random_start=spec.random_start,
                 step_size="2·eps·(1 − t/steps), heavy-ball momentum 0.75",
                 reweighting="mean over active members of unit-norm per-member loss gradients (active: every "
                             "member for logits ensembles, the members still correct for softmax and vote "
                             "ensembles)",
                 scoring="every iterate on the deployed rule")
    elif spec.name == "cw":
        p.update(steps=spec.steps, c=spec.c, lr=spec.lr, kappa=spec.kappa, restarts=1,
                 note="minimal-perturbation L2 attack: an example counts as broken at eps when CW found an "
                      "adversarial example with L2 distance <= eps")
    elif spec.name == "square":
        p.update(n_queries=spec.n_queries, p_init=0.8, square_loss="margin" if attack_losses(spec) == ["cw"] else
                 "ce" if attack_losses(spec) == ["ce"] else "ce+margin")
    elif spec.name == "autoattack":
        p.update(version=spec.version, components=REFERENCE_COMPONENTS[spec.version],
                 note="the reference AutoAttack at its own iteration counts, restarts and target classes (never "
                      "reduced), on the deployed rule's differentiable view; its examples are scored on the "
                      "deployed rule")
    elif spec.name == "autoattack_port":
        p.update(version=spec.version, components=PORT_COMPONENTS[spec.version],
                 note="torchattacks' port (APGD/APGD-T/FAB at torchattacks' defaults); not the reference")
    if "cw" in attack_losses(spec) and spec.name not in ("cw", "square"):
        p["kappa"] = spec.kappa
    if "vote" in attack_losses(spec):
        p["vote_hinge_kappa"] = spec.kappa
    if "softvote" in attack_losses(spec):
        p["vote_temperature"] = spec.vote_temperature
    p["implementation"] = implementation_name(spec)
    return p


def implementation_name(spec: AttackSpec) -> str:
    if spec.name in ITERATIVE:
        return ("ensemble_core.evaluation.engine.GradientAttack (torchattacks 3.5.1's update rule, "
                "our objectives, best-iterate scoring)")
    if spec.name == "mora":
        return "ensemble_core.evaluation.engine.MoraAttack (written from the MORA paper)"
    if spec.name == "cw":
        return (f"ensemble_core.evaluation.attacks.CWMasked (torchattacks {TORCHATTACKS_VERSION} CW with the "
                "masked CW margin)")
    if spec.name == "autoattack":
        return f"pyautoattack {PYAUTOATTACK_VERSION} AutoAttack (the reference, by its authors)"
    base = {"square": "Square", "autoattack_port": "AutoAttack"}[spec.name]
    return f"torchattacks {TORCHATTACKS_VERSION} {base}"


# ------------------------------------------------------------------------------------------ losses


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


def _members_and_view(model: nn.Module) -> tuple[Any, CombineRule]:
    """``x -> (K, N, C)`` and the rule that maps them to the attacked output (a plain module is one member)."""
    if isinstance(model, Ensemble):
        return model.member_logits, model.rule
    return (lambda x: model(x).unsqueeze(0)), combine_rule("mean_logits")


def voter_indices(ens: Ensemble, rule: CombineRule) -> list[int]:
    """Indices of the members ``rule`` listens to (its vote's voters; every member otherwise)."""
    k = len(ens)
    if rule.vote is None:
        return list(range(k))
    probe = torch.arange(k, dtype=torch.float32).view(k, 1, 1)
    return [int(i) for i in rule.vote.voters(probe).flatten().tolist()]


def build_attack(model: nn.Module, spec: AttackSpec, eps: float, loss: str, *, num_classes: int,
                 seed: int = 0, deployed: CombineRule | None = None, steps: int | None = None) -> Any:
    """One attack for ``spec`` at ``eps`` with ``loss``, on ``model`` (the ensemble's attack target).

    ``deployed``: the rule the examples are scored on (default: ``model``'s own rule); the vote-aware
    losses and the ensemble-aware attack read it. Returns a callable ``atk(x, y) -> adv``; the engine's
    attacks also have ``run(x, y, scorer)`` (best-iterate scoring).
    """
    steps = steps or spec.steps
    if deployed is None and isinstance(model, Ensemble):
        deployed = model.rule
    if spec.name in ITERATIVE:
        members, view = _members_and_view(model)
        objective = make_objective(loss, view, deployed, kappa=spec.kappa, temperature=spec.vote_temperature)
        reduction = "mean" if loss == "ce" else "sum"
        if spec.name == "fgsm":
            return GradientAttack(members, objective, kind="fgsm", eps=eps, reduction=reduction)
        return GradientAttack(members, objective, kind=spec.name, eps=eps, alpha=default_alpha(spec, eps),
                              steps=steps, random_start=spec.random_start and spec.name in ("pgd", "pgdl2"),
                              decay=spec.momentum, reduction=reduction)
    if spec.name == "mora":
        if loss in VOTE_LOSSES:
            raise ValueError(f"losses: mora takes ce, cw or dlr, not {loss!r}")
        ens = model if isinstance(model, Ensemble) else Ensemble([model], "mean_logits")
        rule = deployed or ens.rule
        mode = spec.mora_mode if spec.mora_mode != "auto" else mora_mode_for(rule.outputs)
        top_n = rule.vote.top_n if (rule.vote is not None and rule.vote.kind == "boosted") else 1
        return MoraAttack(list(ens.members), loss=loss, eps=eps, steps=steps, norm=attack_norm(spec), mode=mode,
                          voters=voter_indices(ens, rule), top_n=top_n, random_start=spec.random_start,
                          kappa=spec.kappa)
    if spec.name == "cw":
        return CWMasked(model, c=spec.c, kappa=spec.kappa, steps=steps, lr=spec.lr)
    if spec.name == "square":
        return torchattacks.Square(model, norm=attack_norm(spec), eps=eps, n_queries=spec.n_queries, n_restarts=1,
                                   loss="margin" if loss == "cw" else "ce", seed=seed % (2**31), verbose=False)
    if spec.name == "autoattack":
        from ensemble_core.evaluation.reference_autoattack import ReferenceAutoAttack

        return ReferenceAutoAttack(model, eps=eps, norm=attack_norm(spec), version=spec.version,
                                   seed=seed % (2**31), n_classes=num_classes)
    if spec.name == "autoattack_port":
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


def run_attack(atk: Any, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """``atk(x, y)`` under ``seed``; returns detached adversarial examples on ``x``'s device."""
    with seeded(seed, x.device):
        return atk(x, y).detach()


def run_scored(atk: Any, x: torch.Tensor, y: torch.Tensor, seed: int, scorer: Scorer) -> Outcome:
    """Run ``atk`` under ``seed`` with best-iterate scoring where it has it (the engine's attacks).

    Other attacks (Square, CW-L2, AutoAttack) give their final examples, scored once with ``scorer``.
    """
    with seeded(seed, x.device):
        if hasattr(atk, "run"):
            return atk.run(x, y, scorer)
        adv = atk(x, y).detach()
    return Outcome(adv, adv, None, None, 1)


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
