"""CCE: Crossing Collaborative Ensemble (Bui et al., AAAI 2021; spec ``specs/cce.md``).

Every step, each member n is attacked by its own white-box PGD (spec §2.6), giving x^n_a, and
minimises (spec §2.5, Eq. 5)

    L_n = C(f^n(x), y) + w_dpo · C(f^n(x^n_a), y)
        + 1/(N−1) · Σ_{i≠n} [ λ_pm · s_{n,i} · C(f^n(x^i_a), y) − λ_dm · (1 − s_{n,i}) · H(f^n(x^i_a)) ]

with s_{n,i} = sg(f^n_y(x^i_a)) (soft indicator, Eq. 3–5), C the cross-entropy and H the Shannon
entropy, both in nats and computed from logits. The objective of a batch is Σ_n mean_batch L_n
(spec correction 2). The paper's formulation is implemented, not the released code's (spec §8 A10).
The ensemble predicts with the mean of the member softmax outputs (spec §3).

This file also holds what the ADV-EN baseline (``adv_en.py``) shares with CCE: the training-attack
hyperparameters and their per-data-set resolution, and the transferability diagnostics of spec
§2.3/§2.9 (subsets S11/S10/S01/S00, a(i,j), T, nT, a_single).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ensemble_core.attacks import crafting_mode, ensemble_log_probs, pgd_linf, stacked_member_pgd_linf
from ensemble_core.data import TensorDataset, to_float
from ensemble_core.detection import entropy_detection
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet

# --------------------------------------------------------------------------------------------------
# Training attack (spec §2.6) and its per-data-set defaults
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingAttack:
    """The resolved PGD used in training: fixed ε or ε ~ U(low, high) per batch; η fixed or ratio·ε."""

    eps: float | None
    eps_range: tuple[float, float] | None
    step_size: float | None
    step_ratio: float
    steps: int
    random_start: bool
    label: str
    bn_mode: str
    source: str

    def draw(self, generator: torch.Generator) -> tuple[float, float]:
        """(ε, η) for one batch. A sampled ε is one scalar per batch shared by every attack of the step
        (spec §8 A13), drawn from the step generator, which is identical on every rank."""
        if self.eps_range is not None:
            lo, hi = self.eps_range
            eps = lo + (hi - lo) * float(torch.rand((), generator=generator))
        else:
            assert self.eps is not None
            eps = self.eps
        return eps, self.step_size if self.step_size is not None else self.step_ratio * eps

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eps_range"] = list(self.eps_range) if self.eps_range is not None else None
        if self.step_size is None and self.eps is not None:
            d["step_size"] = self.step_ratio * self.eps
        return d


EpsDefault = tuple[float | None, tuple[float, float] | None, float, str]


def default_training_attack(dataset: str, architecture: str) -> EpsDefault:
    """(ε, ε-range, η/ε, source) of the spec's training PGD for a data set and architecture (spec §2.6, §4).

    CIFAR values are the paper's; the paper has no MNIST/Fashion-MNIST results, so those are this
    project's recommendation (the standard L∞ threat models of the two data sets, with the paper's
    CNN step ratio η = ε/4 at k = 10); see ``docs/methods/cce.md``.
    """
    resnet = architecture.startswith("resnet")
    if dataset == "cifar10":
        if resnet:
            return None, (0.01, 0.05), 0.1, "[paper] CIFAR-10 ResNet-20: eps ~ U(0.01, 0.05), eta = eps/10"
        return 8 / 255, None, 0.25, "[paper] CIFAR-10 CNN: eps = 8/255, eta = 2/255"
    if dataset == "cifar100":
        src = "[paper] CIFAR-100 CNN: eps = 0.01, eta = 0.001"
        if resnet:
            src = "[rec] CIFAR-100 ResNet not reported: the CIFAR-100 CNN setting (extrapolated)"
        return 0.01, None, 0.1, src
    if dataset == "mnist":
        return 0.3, None, 0.25, "[rec] MNIST not reported: eps = 0.3 (standard MNIST L-inf), eta = eps/4"
    if dataset == "fashion_mnist":
        return 0.1, None, 0.25, "[rec] Fashion-MNIST not reported: eps = 0.1, eta = eps/4"
    return 0.1, None, 0.25, f"[rec] {dataset}: eps = 0.1, eta = eps/4 (test data)"


class AdversarialTrainingHyperparameters(Hyperparameters):
    """Training-attack knobs shared by CCE and ADV-EN (spec §2.6, §4, §8 A2/A3/A13)."""

    eps: float | None = Field(None, gt=0, le=1, description=(
        "ε_train: L∞ radius of the training PGD in [0, 1] pixel units; None = the data set's default "
        "(the paper's CIFAR-10 CNN 8/255 and CIFAR-100 0.01; MNIST 0.3 and Fashion-MNIST 0.1 are this "
        "project's choice, the paper has no MNIST results)"))
    eps_range: tuple[float, float] | None = Field(None, description=(
        "ε_train ~ U(low, high), one draw per batch shared by all attacks of the step (the CIFAR-10 "
        "ResNet-20 setting, default there: (0.01, 0.05)); exclusive with eps"))
    step_size: float | None = Field(None, gt=0, le=1, description=(
        "η_train: PGD step; None = the data set's ratio × ε (ε/4 for the CNN settings, ε/10 for CIFAR-100 "
        "and the ResNet setting)"))
    steps: int = Field(10, ge=1, le=1000, description="k_train: PGD iterations during training (paper: 10)")
    random_start: bool = Field(True, description="uniform random start in the ε-ball (Madry PGD, one start)")
    attack_label: Literal["true", "pred"] = Field("true", description=(
        "labels the training PGD ascends: 'true' = ground truth (spec §8 A2), 'pred' = the attacked model's "
        "clean prediction (the released code)"))
    attack_bn_mode: Literal["eval", "train"] = Field("eval", description=(
        "network mode while crafting: 'eval' = BatchNorm running statistics, no dropout (spec §8 A3); "
        "'train' = batch statistics and dropout, running statistics left unchanged"))
    metric_steps: int = Field(20, ge=0, le=1000, description=(
        "PGD iterations of the final transferability/detection diagnostics (spec §2.9: k = 20); "
        "0 = skip them"))
    metric_eps: float | None = Field(None, gt=0, le=1, description=(
        "ε of the final diagnostics; None = the training ε (CIFAR-10 with a sampled ε: 8/255)"))
    metric_step_size: float | None = Field(None, gt=0, le=1, description=(
        "η of the final diagnostics; None = the training ratio × metric ε"))
    metric_examples: int = Field(1000, ge=1, le=10_000, description=(
        "the diagnostics use the first this-many images of the final test subset"))

    @field_validator("eps_range")
    @classmethod
    def _eps_range(cls, v: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        if v is None:
            return v
        lo, hi = v
        if not 0 < lo < hi <= 1:
            raise ValueError("eps_range must be (low, high) with 0 < low < high <= 1")
        if info.data.get("eps") is not None:
            raise ValueError("eps_range and eps are exclusive: give one of them")
        return v


def resolve_training_attack(hp: AdversarialTrainingHyperparameters, dataset: str, architecture: str
                            ) -> TrainingAttack:
    eps, eps_range, ratio, source = default_training_attack(dataset, architecture)
    if hp.eps is not None:
        eps, eps_range, source = hp.eps, None, "hyperparameters.eps"
    elif hp.eps_range is not None:
        eps, eps_range, source = None, tuple(hp.eps_range), "hyperparameters.eps_range"
    return TrainingAttack(eps=eps, eps_range=eps_range, step_size=hp.step_size, step_ratio=ratio,
                          steps=hp.steps, random_start=hp.random_start, label=hp.attack_label,
                          bn_mode=hp.attack_bn_mode, source=source)


def metric_attack(hp: AdversarialTrainingHyperparameters, attack: TrainingAttack, dataset: str
                  ) -> tuple[float, float, int]:
    """(ε, η, k) of the final diagnostics: the training setting at k = metric_steps by default (spec §2.9)."""
    if hp.metric_eps is not None:
        eps = hp.metric_eps
    elif attack.eps is not None:
        eps = attack.eps
    elif dataset == "cifar10":
        eps = 8 / 255  # the paper's evaluation radius for CIFAR-10
    else:
        assert attack.eps_range is not None
        eps = sum(attack.eps_range) / 2
    step = hp.metric_step_size if hp.metric_step_size is not None else attack.step_ratio * eps
    return eps, step, hp.metric_steps


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def random_start_noise(ctx: StepContext, local_size: int, copies: int,
                       shape: tuple[int, ...]) -> torch.Tensor:
    """U[-1, 1] noise ``(copies, B, *shape)`` from the global-batch draw, so one process with the whole
    batch and W ranks with slices start every sample's PGD at the same point."""
    u = ctx.global_rand(local_size, copies, *shape)
    return (2 * u - 1).transpose(0, 1).contiguous()


def member_forwards(members: list[nn.Module], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits ``(len(inputs), B, C)`` of each member on each input batch.

    Separate forward calls per input batch when a member has BatchNorm (each batch gets its own batch
    statistics, spec §8 A14); without BatchNorm the batches are concatenated into one call, which is
    the same function and cheaper.
    """
    out = []
    for m in members:
        if has_batchnorm(m):
            out.append(torch.stack([m(z) for z in inputs]))
        else:
            b = inputs[0].shape[0]
            out.append(m(torch.cat(inputs)).view(len(inputs), b, -1))
    return out


# --------------------------------------------------------------------------------------------------
# The CCE loss (spec §2.5)
# --------------------------------------------------------------------------------------------------


def cce_loss_from_logits(clean: torch.Tensor, cross: torch.Tensor, y: torch.Tensor, lam_pm: float,
                         lam_dm: float, w_dpo: float = 1.0,
                         indicator: str = "soft") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Spec §2.5 Eq. 5 for every member, from logits.

    ``clean``: ``(N, B, C)``, member n on the clean batch. ``cross``: ``(N, N, B, C)``, entry ``[n, i]``
    = member n on member i's adversarial batch x^i_a (the diagonal is dPO's input). Returns the
    per-member losses ``(N,)`` (each a batch mean; their sum is the objective) and the named terms,
    each ``(N,)`` and already weighted: ``clean``, ``dpo`` (= w_dpo·C), ``cpo`` (= λ_pm/(N−1)·Σ s·C),
    ``do`` (= λ_dm/(N−1)·Σ (1−s)·H, *subtracted* in L_n), ``s`` (mean soft indicator).

    ``indicator='soft'``: s = sg(f^n_y(x^i_a)) (Eq. 3–5); ``'hard'``: s = 1[argmax f^n(x^i_a) = y]
    (Eq. 1–2). Either way s carries no gradient.
    """
    n_members = clean.shape[0]
    if cross.shape[:2] != (n_members, n_members):
        raise ValueError("cross must be (N, N, B, C) with N the number of members in clean")
    ce_clean = F.cross_entropy(clean.flatten(0, 1), y.repeat(n_members), reduction="none").view(n_members, -1)
    lp = F.log_softmax(cross, dim=-1)  # (N, N, B, C)
    yy = y.view(1, 1, -1, 1).expand(n_members, n_members, -1, 1)
    lp_y = lp.gather(-1, yy).squeeze(-1)  # (N, N, B)
    ce = -lp_y
    eye = torch.eye(n_members, dtype=torch.bool, device=clean.device)
    dpo = w_dpo * ce[eye].mean(-1)  # (N,)
    loss = ce_clean.mean(-1) + dpo
    terms = {"clean": ce_clean.mean(-1).detach(), "dpo": dpo.detach()}
    if n_members > 1:
        p = lp.exp()
        ent = -(p * lp).sum(-1)  # H(f^n(x^i_a)), (N, N, B)
        if indicator == "soft":
            s = lp_y.detach().exp()
        elif indicator == "hard":
            s = (lp.detach().argmax(-1) == y.view(1, 1, -1)).to(lp.dtype)
        else:
            raise ValueError(f"indicator must be 'soft' or 'hard', got {indicator!r}")
        off = (~eye).to(lp.dtype)[:, :, None]  # only i ≠ n
        scale = 1.0 / (n_members - 1)
        cpo = scale * lam_pm * (off * s * ce).mean(-1).sum(1)
        do = scale * lam_dm * (off * (1 - s) * ent).mean(-1).sum(1)
        loss = loss + cpo - do
        terms.update(cpo=cpo.detach(), do=do.detach(),
                     s=((off * s).sum((1, 2)) / (off.sum((1, 2)) * s.shape[-1])).detach())
    return loss, terms


# --------------------------------------------------------------------------------------------------
# Transferability diagnostics (spec §2.3, §2.9, §7.4, §9.2)
# --------------------------------------------------------------------------------------------------


def subset_metrics(member_correct: torch.Tensor, ensemble_correct: torch.Tensor) -> dict[str, Any]:
    """Spec §2.3/§2.9 cells from per-point correctness on the ensemble's adversarial examples x^en_a.

    ``member_correct``: ``(N, P)`` bool, member n right at point p; ``ensemble_correct``: ``(P,)``.
    Cells ``S<b_1…b_N>`` with b_n = 1 iff member n is right (N = 2: S11, S10, S01, S00, where the
    first digit is f¹ as in Table 1), in % of the P points; all 2^N cells for N ≤ 6, else the
    non-empty ones. ``a_en`` = a(en,en); ``nT`` = % fooling the ensemble although not every member
    is fooled; ``a_single`` = % the ensemble gets right although not every member does (N = 2:
    exactly one, when ``a_en_all_wrong`` is 0); ``a_en_all_wrong`` = % the ensemble gets right while
    every member is wrong (possible with averaged probabilities, rare). Identities (§9.2):
    ``a_single = a_en − |S1…1|`` always (Lemma 1), ``nT = 100 − a_en − |S0…0| + a_en_all_wrong``,
    i.e. the paper's ``nT = 100 − a(en,en) − |S00|`` exactly when ``a_en_all_wrong`` = 0.
    """
    mc = member_correct.bool().cpu()
    ec = ensemble_correct.bool().cpu()
    n, p = mc.shape
    if ec.shape != (p,):
        raise ValueError("ensemble_correct must have one entry per point")
    pct = 100.0 / max(p, 1)
    weights = 2 ** torch.arange(n - 1, -1, -1)
    code = (mc.long() * weights[:, None]).sum(0)  # member 1 is the most significant bit
    counts = torch.bincount(code, minlength=2**n)
    cells = {}
    for c in range(2**n):
        if n <= 6 or counts[c] > 0:
            bits = format(c, f"0{n}b")
            cells[f"S{bits}"] = counts[c].item() * pct
    all_right, all_wrong = mc.all(0), ~mc.any(0)
    return {
        "points": p,
        "cells": cells,
        "a_en": ec.sum().item() * pct,
        "nT": (~ec & ~all_wrong).sum().item() * pct,
        "a_single": (ec & ~all_right).sum().item() * pct,
        "a_single_exactly_one": (ec & (mc.sum(0) == 1)).sum().item() * pct,
        "a_en_all_wrong": (ec & all_wrong).sum().item() * pct,
        "all_right": all_right.sum().item() * pct,
        "all_wrong": all_wrong.sum().item() * pct,
        "member_acc_on_en": [row.sum().item() * pct for row in mc],
    }


def transfer_gap(a: list[list[float]]) -> dict[str, float]:
    """T = Σ_{i≠j} [a(i,j) − a(i,i)] over ordered pairs (N = 2: spec §2.9's T), and its mean per pair.

    ``a[i][j]`` = accuracy (%) of member j on member i's PGD examples; a larger T means less transfer.
    """
    n = len(a)
    gaps = [a[i][j] - a[i][i] for i in range(n) for j in range(n) if i != j]
    return {"T": float(sum(gaps)), "T_per_pair": float(sum(gaps) / len(gaps)) if gaps else 0.0}


def transferability_report(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float,
                           alpha: float, steps: int, seed: int = 0, batch_size: int = 500) -> dict[str, Any]:
    """Member transferability on images ``x`` (spec §2.9, Table 6), in %.

    PGD (one uniform random start from ``seed``, ``steps`` iterations of ``alpha``, radius ``eps``,
    ground-truth labels) on each member alone gives x^i_a and a(i,j); PGD on the ensemble's
    ``log f^en`` (mean of softmaxes) gives x^en_a, a(en,en) and the subsets of :func:`subset_metrics`.
    Also returns the entropy-detector AUC on clean vs x^en_a (:mod:`ensemble_core.detection`). Members
    are run in eval mode. Returns the adversarial examples' correctness, not the examples.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(members)
    correct = torch.zeros(n, n, dtype=torch.long)  # [i, j]: member j right on x^i_a
    member_right_en, ens_right_en, x_en_all = [], [], []
    with crafting_mode(members, "eval"):
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            noise = 2 * torch.rand((n, *xb.shape), generator=gen) - 1
            x_adv = stacked_member_pgd_linf(members, xb, yb, eps, alpha, steps, noise.to(xb))
            noise_en = 2 * torch.rand(xb.shape, generator=gen) - 1
            x_en = pgd_linf(lambda z, yb=yb: F.nll_loss(ensemble_log_probs(members, z), yb, reduction="sum"),
                            xb, eps, alpha, steps, noise_en.to(xb))
            with torch.no_grad():
                for i in range(n):
                    for j, m in enumerate(members):
                        correct[i, j] += (m(x_adv[i]).argmax(-1) == yb).sum().cpu()
                member_right_en.append(torch.stack([m(x_en).argmax(-1) == yb for m in members]).cpu())
                ens_right_en.append((ensemble_log_probs(members, x_en).argmax(-1) == yb).cpu())
            x_en_all.append(x_en)
        x_en_cat = torch.cat(x_en_all)
        detection = entropy_detection(members, x, y, x_en_cat, batch_size)
    pct = 100.0 / x.shape[0]
    a = (correct.double() * pct).tolist()
    report: dict[str, Any] = {
        "attack": {"name": "pgd", "eps": eps, "step_size": alpha, "steps": steps, "restarts": 1,
                   "random_start": True, "labels": "true", "seed": seed, "n": int(x.shape[0])},
        "a_member": a,
        "a_self": [a[i][i] for i in range(n)],
        **transfer_gap(a),
        **subset_metrics(torch.cat(member_right_en, 1), torch.cat(ens_right_en)),
        "detection": detection,
    }
    return report


def adversarial_diagnostics(method: Method, hp: AdversarialTrainingHyperparameters, attack: TrainingAttack,
                            net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
    """``results()`` body shared by CCE and ADV-EN: the resolved training attack, then the diagnostics."""
    out: dict[str, Any] = {"training_attack": attack.as_dict()}
    eps, alpha, steps = metric_attack(hp, attack, method.dataset)
    if steps == 0 or len(test) == 0:
        return out
    n = min(hp.metric_examples, len(test))
    x, y = to_float(test.images[:n].to(device)), test.labels[:n].to(device)
    report = transferability_report(list(net.members), x, y, eps, alpha, steps)
    report["attack"]["subset"] = f"first {n} images of the final test subset (report split)"
    out["transferability"] = report
    return out


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

_MODES = {"robustness": (1.0, 1.0), "detection": (0.0, 5.0), "base": (0.0, 0.0)}


class CCEHyperparameters(AdversarialTrainingHyperparameters):
    mode: Literal["robustness", "detection", "base"] = Field("robustness", description=(
        "preset of (λ_pm, λ_dm) (spec §2.8): robustness = CCE-RM (1, 1), detection = CCE-DM (0, 5), "
        "base = CCE-Base ablation (0, 0); an explicit lam_pm / lam_dm overrides the preset"))
    lam_pm: float | None = Field(None, ge=0, le=100, description=(
        "λ_pm: weight of crossing promotion (cPO), C on other members' adversarial examples weighted by s; "
        "None = the mode's value (paper explored 0, 1, 2, 5)"))
    lam_dm: float | None = Field(None, ge=0, le=100, description=(
        "λ_dm: weight of demotion (DO), entropy maximised on other members' adversarial examples weighted by "
        "1 − s; None = the mode's value (paper explored 0, 1, 2, 5)"))
    w_dpo: float = Field(1.0, ge=0, le=100, description=(
        "weight of direct promotion C(f^n(x^n_a), y) (implicit 1 in the paper; code flag wce)"))
    indicator: Literal["soft", "hard"] = Field("soft", description=(
        "s_{n,i}: 'soft' = detached f^n_y(x^i_a) (Eq. 3–5, the paper's), 'hard' = 1[argmax = y] (Eq. 1–2)"))

    @model_validator(mode="after")
    def _resolve_mode(self) -> CCEHyperparameters:
        pm, dm = _MODES[self.mode]
        if self.lam_pm is None:
            self.lam_pm = pm
        if self.lam_dm is None:
            self.lam_dm = dm
        return self


@register_method
class CCE(Method):
    name = "cce"
    title = "Crossing Collaborative Ensemble (CCE)"
    summary = ("Each member is adversarially trained on its own PGD examples and, on every other member's, "
               "promotes the true class where it is right and flattens its output where the attack transfers "
               "(Bui et al., AAAI 2021). Modes: robustness (CCE-RM), detection (CCE-DM), base.")
    spec_file = "specs/cce.md"
    Hyperparameters = CCEHyperparameters
    default_combine = "mean_probs"
    min_members = 1  # N = 1 is ADV (single-model Madry training); the crossing terms need N ≥ 2

    def __init__(self, hp: CCEHyperparameters, **kwargs: Any) -> None:  # type: ignore[override]
        super().__init__(hp, **kwargs)
        self.hp: CCEHyperparameters = hp
        self.attack = resolve_training_attack(hp, self.dataset, self.architecture)

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Spec §2.5 Eq. 5 summed over members, with the per-member PGD of §2.6 / §2.7.

        1. PGD on each member alone (batched: copy k of the batch is scored by member k only), crafted
           on the unwrapped members in the ``attack_bn_mode`` (default eval; train mode restored).
           Random starts come from ``ctx.global_rand`` so they do not depend on the worker count.
        2. Member n on clean x and on every x^i_a (one forward per member without BatchNorm).
        3. Σ_n [C(clean) + w_dpo·C(x^n_a) + 1/(N−1)·Σ_{i≠n} (λ_pm·s·C − λ_dm·(1−s)·H)], s detached.
        """
        hp, atk = self.hp, self.attack
        members = net.trainable()
        n, b = len(members), x.shape[0]
        eps, alpha = atk.draw(ctx.generator)
        noise = random_start_noise(ctx, b, n, tuple(x.shape[1:])) if atk.random_start else None
        with crafting_mode(members, atk.bn_mode):
            if atk.label == "pred":
                with torch.no_grad():
                    y_att = torch.stack([m(x).argmax(-1) for m in members])
            else:
                y_att = y
            x_adv = stacked_member_pgd_linf(members, x, y_att, eps, alpha, atk.steps, noise)
        logits = member_forwards(members, [x, *x_adv.unbind(0)])  # per member: (1 + N, B, C)
        clean = torch.stack([z[0] for z in logits])
        cross = torch.stack([z[1:] for z in logits])
        lam_pm, lam_dm = float(hp.lam_pm or 0.0), float(hp.lam_dm or 0.0)  # resolved by the mode validator
        per_member, terms = cce_loss_from_logits(clean, cross, y, lam_pm, lam_dm, hp.w_dpo, hp.indicator)
        with torch.no_grad():
            right = cross.argmax(-1) == y.view(1, 1, -1)  # [n, i, b]: member n right on x^i_a
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            log = {"ce_clean": terms["clean"].sum(), "dpo": terms["dpo"].sum()}
            if n > 1:
                log.update(cpo=terms["cpo"].sum(), do=terms["do"].sum(), s_mean=terms["s"].mean())
            log["acc_own_adv"] = right[eye].float().mean()
            if n > 1:
                log["acc_cross_adv"] = right[~eye].float().mean()
            log["eps"] = torch.tensor(eps, device=x.device)
        return LossOutput(per_member.sum(), log)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member: k PGD steps on its own copy of the batch (one input gradient each), then a
        forward+backward on the clean batch and on every member's adversarial batch (1 + N batches);
        with ``attack_label = pred`` one more no-grad forward for the labels (issue 13)."""
        n = float(len(stage.train_members))
        cost = {"input_grad": n * self.attack.steps, "fwd_bwd": n * (1 + n)}
        if self.attack.label == "pred":
            cost["fwd"] = n
        return cost

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Resolved training attack and hyperparameters, member transferability (a(i,j), T, S-cells,
        nT, a_single; spec §2.9) and the entropy detector's AUC on clean vs ensemble-PGD images."""
        out = adversarial_diagnostics(self, self.hp, self.attack, net, test, device)
        out["lam_pm"], out["lam_dm"], out["w_dpo"] = self.hp.lam_pm, self.hp.lam_dm, self.hp.w_dpo
        return out


__all__ = ["CCE", "AdversarialTrainingHyperparameters", "TrainingAttack", "cce_loss_from_logits",
           "default_training_attack", "resolve_training_attack", "subset_metrics", "transfer_gap",
           "transferability_report"]
