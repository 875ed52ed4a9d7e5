"""PDD + DEG: priority diversified dropouts with dispersed ensemble gradients (Huang et al., AAAI 2021).

Spec: ``shared/specs/pdd.md``. K members are trained simultaneously on the same batches.

* **PDD** (spec §4): a training-only, data-dependent dropout on the members' penultimate features.
  Per example, all K·D feature values share one histogram of M equal-width bins; the K most
  populated bins are handed out one per member (member k gets the k-th); member k keeps units in its
  priority bin with probability α and any other unit with probability β·(1 − that bin's share of
  member k's units). No 1/p rescaling, identity at evaluation.
* **DEG** (spec §5.2): λ · Σ_{i<j} mean_n cos(∇ₓCE_i(x_n), ∇ₓCE_j(x_n)), obtained with
  ``torch.autograd.grad(create_graph=True)`` and then one ordinary backward by the shared loop.
* Inference (spec §6.1): the mean of the members' softmax probabilities (``mean_probs``).

``variant`` selects the paper's ablation (spec §5.3): ``baseline``, ``pdd``, ``deg``, ``pdd_deg``.
The mask is computed entirely with torch ops on the features' device (no numpy, no host sync) and its
randomness comes from :meth:`StepContext.global_rand`, one uniform per (sample, member, unit) drawn
for the whole global batch, so a rank's masks do not depend on the number of ranks.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet

Variant = Literal["pdd_deg", "pdd", "deg", "baseline"]
# Spec §5.2 suggests ε ≈ 1e-12 on the product of norms. Input gradients of confidently classified examples
# are far smaller than that (on a trained MNIST ensemble 95% of pair products were < 1e-12), so such an ε
# would silently shrink their cosines towards 0. Norms are computed in float64 and each is floored at
# NORM_EPS instead: the cosine is exact unless a gradient is below 1e-20, and 1/‖g‖ stays far inside the
# float32 range for the double-backward pass. An exactly zero gradient gives cos 0, never NaN.
NORM_EPS = 1e-20
DISCRIM_EPS = 1e-12  # eq. 6 denominator floor
RANGE_EPS = 1e-12  # spec §4.1 edge case: v = u


def default_intervals(members: int) -> int:
    """The paper's M for K members (spec §8): 10 for K = 3, 20 for K = 5.

    Other K are not in the paper; M = 5·(K − 1) is the line through both published points, and
    always satisfies M > K for K ≥ 2.
    """
    return 5 * (members - 1) if members >= 2 else 2


class PDDHyperparameters(Hyperparameters):
    variant: Variant = Field(
        "pdd_deg", description="which terms are active: pdd_deg (the paper's method), pdd (PDD only, λ "
        "unused), deg (DEG only, no dropout), baseline (neither); the paper's ablation (spec §5.3)")
    M: int | None = Field(
        None, ge=2, le=100_000,
        description="PDD: number of equal-width activation-strength intervals, M > K; default (null): 10 for "
        "K=3, 20 for K=5 (paper), 5·(K−1) for other K")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="PDD α: keep probability of a member's units in "
                         "its priority interval (eq. 2)")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="PDD β: keep probability cap outside the priority "
                        "interval, scaled by 1 − the interval's share of the member's units (eq. 2)")
    lam: float = Field(0.01, ge=0.0, le=100.0, description="DEG λ: weight of the summed pairwise cosine of "
                       "the members' input gradients (eq. 4); the code's --beta flag")
    ce_reduction: Literal["mean", "sum"] = Field(
        "mean", description="ensemble CE over members: mean (authors' code, spec §5.1 [R]; λ keeps its "
        "published meaning) or sum (paper eq. 1; equivalent to mean with λ·K, lr/K, wd·K under SGD)")


# ----------------------------------------------------------------------------------------------
# PDD (spec §4)


@torch.no_grad()
def pdd_keep_prob(feats: torch.Tensor, M: int, alpha: float,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep probabilities of eq. 2 for every unit, per example (spec §4.1, vectorised as §4.3).

    ``feats``: ``[B, K, D]`` penultimate features (detached). Returns ``(p [B, K, D], t [B, K])``
    where ``t[:, k]`` is member k's priority interval. Ties in the interval ranking follow the
    reference: among equal counts the interval whose first unit (member 1's units first) comes later
    ranks higher; empty intervals rank below non-empty ones, lower index first (spec §4.1 edge cases).
    """
    B, K, D = feats.shape
    if not K < M:
        raise ValueError(f"PDD needs more intervals than members (M > K); got M={M}, K={K}")
    n = K * D
    dev = feats.device
    flat = feats.reshape(B, n).float()
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    bins = torch.floor((flat - lo) * M / (hi - lo).clamp_min(RANGE_EPS)).long().clamp_(0, M - 1)  # [B, n]
    # One-hot comparison instead of scatter_add_: deterministic on every device, [B, n, M] booleans.
    onehot = bins.unsqueeze(-1) == torch.arange(M, device=dev)
    counts = onehot.sum(1)  # [B, M] ensemble counts
    first = onehot.to(torch.uint8).argmax(1)  # [B, M] index of the interval's first unit (argmax: first max)
    empty_rank = -torch.arange(M, device=dev).expand(B, M)
    key = torch.where(counts > 0, counts * (n + 1) + first, empty_rank)  # unique keys: topk has no ties
    t = key.topk(K, dim=1).indices  # [B, K]; member k gets the k-th most populated interval
    bins = bins.view(B, K, D)
    member_counts = onehot.view(B, K, D, M).sum(2)  # N_m^(k), [B, K, M]
    density = member_counts.gather(2, bins).to(feats.dtype) / D  # N_m^(k) / C_k of each unit's interval
    priority = bins == t.unsqueeze(-1)
    p = torch.where(priority, torch.full_like(density, alpha), beta * (1.0 - density))
    return p, t


@torch.no_grad()
def pdd_mask(feats: torch.Tensor, uniform: torch.Tensor, M: int, alpha: float,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bernoulli(p) masks from given U[0,1) draws: ``keep = uniform < p`` (spec §4.1 step 7).

    Returns ``(mask [B, K, D] in feats' dtype, p, t)``. A constant for autograd (step 8).
    """
    p, t = pdd_keep_prob(feats, M, alpha, beta)
    return (uniform < p).to(feats.dtype), p, t


# ----------------------------------------------------------------------------------------------
# DEG (spec §5.2) and diagnostics (spec §6.4)


def pairwise_cosines(grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-example cosine between every pair of members' input gradients: ``[B, P]``, P = K(K−1)/2.

    Each gradient is flattened over C·H·W; pairs in (0,1), (0,2), …, (1,2), … order. Computed in
    float64 (a ``[B, K, C·H·W]`` tensor: cheap) with each norm floored at ``NORM_EPS``; returned in the
    gradients' dtype.
    """
    dtype = grads[0].dtype
    g = torch.stack([gi.flatten(1) for gi in grads], 1).double()  # [B, K, CHW]
    gram = g @ g.transpose(1, 2)  # [B, K, K]
    norms = g.norm(dim=2).clamp_min(NORM_EPS)  # [B, K]
    cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1))
    i, j = torch.triu_indices(len(grads), len(grads), offset=1, device=cos.device)
    return cos[:, i, j].to(dtype)


def deg_penalty(grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """L_g of eq. 3: Σ_{i<j} mean_n cos(g_i(x_n), g_j(x_n)) (spec §5.2, A5); in [−K/2, K(K−1)/2]."""
    return pairwise_cosines(grads).mean(0).sum()


def entropy_diversity(correct: torch.Tensor) -> torch.Tensor:
    """Kuncheva–Whitaker entropy E of eq. 5 (spec §6.4) from ``correct [K, N]`` (member k right on x_n).

    E = mean_n min(l_n, K − l_n) / (K − ⌈K/2⌉), l_n = number of members right on x_n; E ∈ [0, 1].
    """
    k = correct.shape[0]
    if k < 2:
        raise ValueError("the entropy diversity needs at least 2 members")
    right = correct.long().sum(0)
    return (torch.minimum(right, k - right).float() / (k - math.ceil(k / 2))).mean()


def feature_discrimination(feats: torch.Tensor, min_active: int = 2) -> torch.Tensor:
    """L_F of eq. 6 per example (spec §6.4, A16): Σ_{i<j} (μ_i − μ_j)² / (σ_i² + σ_j²).

    ``feats [N, K, D]``; μ_k, σ_k² are the mean and (population) variance of member k's activated
    (> 0) units. Examples where a member has fewer than ``min_active`` activated units are NaN.
    """
    n, k, _ = feats.shape
    active = feats > 0
    cnt = active.sum(2).to(feats.dtype)
    mu = (feats * active).sum(2) / cnt.clamp_min(1)
    var = (((feats - mu.unsqueeze(2)) ** 2) * active).sum(2) / cnt.clamp_min(1)
    i, j = torch.triu_indices(k, k, offset=1, device=feats.device)
    score = ((mu[:, i] - mu[:, j]) ** 2 / (var[:, i] + var[:, j]).clamp_min(DISCRIM_EPS)).sum(1)
    valid = (cnt >= min_active).all(1)
    return torch.where(valid, score, torch.full_like(score, float("nan")))


def diversity_diagnostics(members: list[nn.Module], test: TensorDataset, device: torch.device | str,
                          batch_size: int = 250) -> dict[str, Any]:
    """Spec §6.4 on clean images with the members in eval mode (no PDD); any ensemble's members.

    * ``entropy_diversity_E``: eq. 5 over every image (Table 1).
    * ``grad_angle_deg_mean`` / ``_median``: per image, the mean over member pairs of the angle between
      the members' input gradients of their own CE (Fig. 3), over the images the ensemble (mean of
      probabilities) gets right. Pairs where a gradient is exactly zero have no angle and are left out.
    * ``grad_zero_frac``: the fraction of (image, member) input gradients that are exactly zero in float32
      (a saturated softmax): a gradient-masking indicator for CE-based attacks.
    * ``feature_discrimination_mean`` / ``_median``: eq. 6 on the penultimate features (Fig. 2), over the
      images the ensemble gets right and where every member has ≥ 2 activated (> 0) units.
    """
    for m in members:
        m.eval()
    k = len(members)
    pi, pj = torch.triu_indices(k, k, offset=1)
    correct, angles, scores, zeros = [], [], [], []
    with torch.enable_grad():
        for x, y in iterate_eval(test, batch_size, device):
            xs = [x.clone().requires_grad_(True) for _ in members]
            parts = [m.forward_parts(xi) for m, xi in zip(members, xs, strict=True)]
            logits = torch.stack([p.logits for p in parts])  # [K, B, C]
            total = sum(F.cross_entropy(z, y, reduction="sum") for z in logits)
            grads = torch.autograd.grad(total, xs)
            with torch.no_grad():
                right = logits.argmax(-1) == y
                ens_right = logits.softmax(-1).mean(0).argmax(-1) == y
                zero = torch.stack([g.flatten(1).abs().amax(1) == 0 for g in grads], 1)  # [B, K]
                valid = ~zero[:, pi.to(zero.device)] & ~zero[:, pj.to(zero.device)]  # [B, P]
                angle = torch.rad2deg(torch.acos(pairwise_cosines(grads).float().clamp(-1.0, 1.0)))
                per_image = (angle * valid).sum(1) / valid.sum(1).clamp_min(1)
                keep = ens_right & valid.any(1)
                score = feature_discrimination(torch.stack([p.features for p in parts], 1))
            correct.append(right)
            zeros.append(zero)
            angles.append(per_image[keep])
            scores.append(score[ens_right])
    if not correct:
        return {"n": 0, "members": k}
    right_all = torch.cat(correct, 1)
    ang = torch.cat(angles)
    sc = torch.cat(scores)
    n_correct = int(sc.numel())
    sc = sc[~torch.isnan(sc)]

    def stat(v: torch.Tensor, f: str) -> float | None:
        return float(getattr(v, f)()) if v.numel() else None

    return {
        "entropy_diversity_E": float(entropy_diversity(right_all)),
        "n": int(right_all.shape[1]), "members": k, "n_ensemble_correct": n_correct,
        "grad_angle_deg_mean": stat(ang, "mean"), "grad_angle_deg_median": stat(ang, "median"),
        "n_grad_angle": int(ang.numel()),
        "grad_zero_frac": float(torch.cat(zeros).float().mean()),
        "feature_discrimination_mean": stat(sc, "mean"), "feature_discrimination_median": stat(sc, "median"),
        "n_feature_discrimination": int(sc.numel()),
    }


# ----------------------------------------------------------------------------------------------


@register_method
class PDD(Method):
    name = "pdd"
    title = "PDD + DEG: priority diversified dropouts with dispersed ensemble gradients"
    summary = ("Members trained simultaneously; a per-example dropout on the penultimate features gives each "
               "member a different activation-strength interval to use (PDD), and a penalty on the pairwise "
               "cosine of the members' input gradients disperses them (DEG). Huang et al., AAAI 2021.")
    spec_file = "specs/pdd.md"
    Hyperparameters = PDDHyperparameters
    default_combine = "mean_probs"  # spec §6.1: mean of member softmax probabilities
    min_members = 2  # the priority assignment, DEG pairs and E (denominator ⌊K/2⌋) need two members

    def __init__(self, hp: Hyperparameters, *, members: int, num_classes: int, dataset: str,
                 architecture: str) -> None:
        super().__init__(hp, members=members, num_classes=num_classes, dataset=dataset,
                         architecture=architecture)
        assert isinstance(hp, PDDHyperparameters)
        problem = self.constraints(members, hp.model_dump())
        if problem:
            raise ValueError(problem)
        self.M = hp.M if hp.M is not None else default_intervals(members)
        self.use_pdd = hp.variant in ("pdd", "pdd_deg")
        self.use_deg = hp.variant in ("deg", "pdd_deg")

    @classmethod
    def constraints(cls, members: int, hp: dict[str, Any]) -> str | None:
        problem = super().constraints(members, hp)
        if problem:
            return problem
        m = hp.get("M")
        if m is not None and m <= members:
            return (f"hyperparameters.M: PDD needs more intervals than members (M > K); "
                    f"got M={m} with {members} members")
        return None

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """L = L_ECE + λ·L_g (spec §5.1–5.3, eq. 4) with PDD on the penultimate features (spec §4.1).

        * One forward per member; under DEG each member reads its own leaf copy of ``x`` so one
          ``autograd.grad`` of Σ_k Σ_n CE_k(x_n) gives every member's own input gradient (spec §5.3
          step 6). The sum over the batch (not the spec's batch mean) is differentiated: the cosine is
          scale invariant, so the values are the same, the norms stay clear of ε, and a sample's
          gradient does not depend on how the global batch is split across ranks.
        * PDD masks come from detached features and ``ctx.global_rand``; the same masks serve the CE
          terms and the input gradients of DEG (spec §5.2). Identity when the module is in eval mode.
        * CE_k updates only member k; λ·L_g updates both members of every pair through second-order
          terms (``create_graph=True``); the returned loss gets one ordinary backward.
        """
        hp: PDDHyperparameters = self.hp  # type: ignore[assignment]
        members = net.trainable()
        k = len(members)
        deg = self.use_deg and k >= 2
        second_order = deg and hp.lam > 0
        xs = [x.detach().clone().requires_grad_(True) for _ in members] if deg else [x] * k
        parts = [m.forward_parts(xi) for m, xi in zip(members, xs, strict=True)]
        terms: dict[str, torch.Tensor] = {}
        idx = net.stage.train_members
        if self.use_pdd and net.training and ctx.training:
            feats = torch.stack([p.features.detach() for p in parts], 1)  # [B, K, D]
            uniform = ctx.global_rand(x.shape[0], k, feats.shape[2]).to(feats.dtype)
            mask, _, t = pdd_mask(feats, uniform, self.M, hp.alpha, hp.beta)
            logits = [m.head(p.features * mask[:, i])
                      for i, (m, p) in enumerate(zip(members, parts, strict=True))]
            keep = mask.mean((0, 2))
            prio = t.float().mean(0)
            for i, mi in enumerate(idx):
                terms[f"keep_{mi}"] = keep[i]
                terms[f"prio_bin_{mi}"] = prio[i]
        else:
            logits = [p.logits for p in parts]
        ce_per_sample = [F.cross_entropy(z, y, reduction="none") for z in logits]
        ces = torch.stack([c.mean() for c in ce_per_sample])
        ece = ces.mean() if hp.ce_reduction == "mean" else ces.sum()
        for i, mi in enumerate(idx):
            terms[f"ce_{mi}"] = ces[i]
        terms["ece"] = ece
        loss = ece
        if deg:
            total = torch.stack([c.sum() for c in ce_per_sample]).sum()
            grads = torch.autograd.grad(total, xs, create_graph=second_order, retain_graph=True)
            l_g = deg_penalty(grads)
            terms["deg"] = l_g.detach()
            if second_order:
                loss = loss + hp.lam * l_g
        return LossOutput(loss, terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member: one double-backprop pass under DEG with λ > 0 (forward, input gradient with
        ``create_graph``, backward through both); with λ = 0 the logged DEG gradient is a first-order input
        gradient beside the ordinary forward+backward; without DEG one forward+backward (issue 13)."""
        k = float(len(stage.train_members))
        if self.use_deg and k >= 2:
            hp: PDDHyperparameters = self.hp  # type: ignore[assignment]
            return {"double": k} if hp.lam > 0 else {"fwd_bwd": k, "input_grad": k}
        return {"fwd_bwd": k}

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Diversity diagnostics of spec §6.4 on the clean test subset (see :func:`diversity_diagnostics`)."""
        was_training = net.training
        out = diversity_diagnostics(list(net.members), test, device)
        net.train(was_training)
        return {**out, "variant": self.hp.variant, "M": self.M}  # type: ignore[attr-defined]
