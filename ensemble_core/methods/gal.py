"""GAL: gradient alignment loss (Kariyappa & Qureshi 2019, "Improving adversarial robustness of ensembles
with diversity training", arXiv 1901.09981). Documentation: ``docs/methods/gal.md``.

All members are trained jointly on

    Σ_i CE_i  +  λ · mean_b log Σ_{i<j} exp(cos(∇_x ℓ_i(x_b), ∇_x ℓ_j(x_b)))

where ``ℓ_i(x_b)`` is member i's cross-entropy on sample b and the cosine is taken between the flattened
per-sample input gradients (signed: aligned gradients are penalised, anti-aligned ones rewarded). The
gradients come from ``torch.autograd.grad(create_graph=True)`` and the returned loss gets one ordinary
backward, so the penalty reaches the weights by double backprop. Inference: the mean of the members'
softmax outputs (the DVERGE/TRS code bases' ``Ensemble``). λ = 0.5 is the value every public re-run
uses (shared ``specs/parl.md`` §7 A19, ``research/anchors.md`` §1.1, the TRS repo's ``script_train.py``).

The helpers :func:`member_input_gradients` and :func:`pairwise_grad_cosines` are shared with TRS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet

# Input gradients of confidently classified samples are tiny (PDD's note: often < 1e-10 in float32), so
# cosines are computed in float64 with each norm floored at NORM_EPS: exact unless a gradient is below
# 1e-20, and an exactly zero gradient gives cosine 0, never NaN.
NORM_EPS = 1e-20
DIAGNOSTIC_IMAGES = 256


def member_input_gradients(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                           create_graph: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward per member on its own leaf copy of ``x``; returns (logits, per-sample input gradients).

    ``grads[i]`` is ``(B, C·H·W)``: row b is ``∇_x CE(f_i(x_b), y_b)``, the gradient of sample b's own
    loss (one ``autograd.grad`` of the summed CE over all members; member graphs do not meet, so each
    copy receives only its member's gradient). With ``create_graph`` the gradients stay in the graph.
    """
    xs = [x.detach().clone().requires_grad_(True) for _ in members]
    logits = [m(xi) for m, xi in zip(members, xs, strict=True)]
    total = torch.stack([F.cross_entropy(z, y, reduction="sum") for z in logits]).sum()
    grads = torch.autograd.grad(total, xs, create_graph=create_graph)
    return logits, [g.flatten(1) for g in grads]


def pairwise_grad_cosines(grads: Sequence[torch.Tensor], eps: float = NORM_EPS,
                          product_floor: float = 0.0) -> torch.Tensor:
    """Per-sample cosine of every member pair i<j (lexicographic): ``(B, P)``, P = N(N−1)/2.

    Computed in float64, each norm floored at ``eps``; returned in the gradients' dtype. With
    ``product_floor`` > 0 the denominator is ``max(‖g_i‖·‖g_j‖, product_floor)``: the cosine of
    ``F.cosine_similarity`` in torch ≤ 1.11 (``x·y / max(‖x‖‖y‖, ε)``), which shrinks the cosine of samples
    whose gradients are small (see :func:`torch19_product_floor`).
    """
    dtype = grads[0].dtype
    g = torch.stack(list(grads), 1).double()  # (B, N, D)
    gram = g @ g.transpose(1, 2)
    norms = torch.linalg.vector_norm(g, dim=2).clamp_min(eps)
    denominator = norms.unsqueeze(2) * norms.unsqueeze(1)
    if product_floor > 0.0:
        denominator = denominator.clamp_min(product_floor)
    cos = gram / denominator
    i, j = torch.triu_indices(len(grads), len(grads), offset=1, device=cos.device)
    return cos[:, i, j].to(dtype)


def torch19_product_floor(cos_eps: float, global_batch: int) -> float:
    """The ``product_floor`` on per-sample gradients that reproduces ``F.cosine_similarity(eps=cos_eps)`` (torch
    ≤ 1.11) applied, as the LSD, DVERGE and TRS reference codes apply it, to the input gradients of the
    *batch-mean* CE, i.e. to each sample's own gradient divided by the batch size B:
    ``(g_i/B)·(g_j/B) / max(‖g_i/B‖‖g_j/B‖, ε) = g_i·g_j / max(‖g_i‖‖g_j‖, ε·B²)``. 0 when ``cos_eps`` is 0."""
    return cos_eps * float(global_batch) ** 2


def gal_coherence(cos: torch.Tensor) -> torch.Tensor:
    """``mean_b log Σ_{i<j} exp(cos_ij,b)`` from ``(B, P)`` cosines (a log-sum-exp: no offset is needed,
    the sum is at least P/e). In [log P − 1, log P + 1]."""
    return torch.logsumexp(cos, dim=1).mean()


def reduce_ce(ces: torch.Tensor, reduction: str) -> torch.Tensor:
    """Members' batch-mean CEs ``(N,)`` combined by ``sum`` or ``mean``."""
    if reduction == "sum":
        return ces.sum()
    if reduction == "mean":
        return ces.mean()
    raise ValueError(f"hyperparameters.ce_reduction: expected 'sum' or 'mean', got {reduction!r}")


def gradient_diagnostics(members: Sequence[nn.Module], test: TensorDataset, device: torch.device | str,
                         n_images: int = DIAGNOSTIC_IMAGES) -> dict[str, Any]:
    """Members in eval mode on the first ``n_images`` test images: the mean signed and absolute cosine of
    the members' per-sample input gradients (per pair and overall) and the mean per-sample gradient norm."""
    sub = test.subset(list(range(min(n_images, len(test)))))
    n = len(members)
    iu = torch.triu_indices(n, n, 1).tolist()
    pairs = [f"{a}-{b}" for a, b in zip(iu[0], iu[1], strict=True)]
    cos_sum = torch.zeros(len(pairs), dtype=torch.float64)
    abs_sum = torch.zeros(len(pairs), dtype=torch.float64)
    norm_sum = torch.zeros(n, dtype=torch.float64)
    seen = 0
    for m in members:
        m.eval()
    with torch.enable_grad():
        for xb, yb in iterate_eval(sub, 128, device):
            _, grads = member_input_gradients(members, xb, yb, create_graph=False)
            cos = pairwise_grad_cosines(grads).double().cpu()
            cos_sum += cos.sum(0)
            abs_sum += cos.abs().sum(0)
            norm_sum += torch.stack([torch.linalg.vector_norm(g.double(), dim=1).sum() for g in grads]).cpu()
            seen += xb.shape[0]
    if seen == 0:
        return {"n_images": 0}
    return {
        "n_images": seen,
        "grad_cos": {p: float(c) / seen for p, c in zip(pairs, cos_sum, strict=True)},
        "grad_cos_mean": float(cos_sum.sum()) / (seen * len(pairs)),
        "grad_abs_cos_mean": float(abs_sum.sum()) / (seen * len(pairs)),
        "grad_norm_mean": {str(i): float(v) / seen for i, v in enumerate(norm_sum)},
    }


class GALHyperparameters(Hyperparameters):
    lam: float = Field(0.5, ge=0.0, le=100.0,
                       description="λ: weight of the gradient alignment (coherence) loss log Σ_{i<j} exp(cos) "
                                   "(0.5 in every public re-run; 0 = independent CE training)")
    ce_reduction: Literal["sum", "mean"] = Field(
        "sum", description="members' CEs summed (the TRS repository's GAL trainer) or averaged (the DVERGE and "
                           "LSD repositories); with 'mean' λ weighs N times more against the CE")
    cos_eps: float = Field(
        0.0, ge=0.0, le=1e-2,
        description="ε of the reference codes' F.cosine_similarity (torch <= 1.11: x·y / max(‖x‖‖y‖, ε)) on the input "
                    "gradients of the batch-mean CE: the cosine's denominator becomes max(‖g_i‖‖g_j‖, ε·B²) for "
                    "per-sample gradients g and global batch B, which damps samples with small gradients. 0 = the "
                    "exact cosine (ours); 1e-8 = the LSD code (torch 1.9) behind CLDL Table IV")


@register_method
class GAL(Method):
    name = "gal"
    title = "GAL: gradient alignment loss"
    summary = ("Members trained jointly on their cross-entropies plus λ times the log-sum-exp of the pairwise "
               "cosines of their per-sample input gradients (double backprop); mean of softmax outputs. "
               "Kariyappa & Qureshi 2019.")
    Hyperparameters = GALHyperparameters
    default_combine = "mean_probs"
    min_members = 2  # a pairwise penalty needs a pair

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """``CE + λ·mean_b log Σ_{i<j} exp(cos(∇_x ℓ_i, ∇_x ℓ_j))``; with λ = 0 plain CE (no double backprop).

        One forward per member serves both terms; each CE updates only its member, the coherence term
        updates every member through second-order terms.
        """
        hp: GALHyperparameters = self.hp  # type: ignore[assignment]
        members = net.trainable()
        ids = net.stage.train_members
        if hp.lam == 0.0 or len(members) < 2:
            ces = torch.stack([F.cross_entropy(m(x), y) for m in members])
            terms = {f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}
            ce = reduce_ce(ces, hp.ce_reduction)
            return LossOutput(ce, {"ce": ce, **terms})
        logits, grads = member_input_gradients(members, x, y, create_graph=True)
        ces = torch.stack([F.cross_entropy(z, y) for z in logits])
        ce = reduce_ce(ces, hp.ce_reduction)
        cos = pairwise_grad_cosines(grads, product_floor=torch19_product_floor(hp.cos_eps, ctx.global_batch_size))
        coh = gal_coherence(cos)
        terms: dict[str, torch.Tensor] = {"ce": ce, "coherence": coh, "grad_cos": cos.mean(),
                                          **{f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}}
        return LossOutput(ce + hp.lam * coh, terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member one double-backprop pass (forward, input gradient with ``create_graph``, backward
        through both); with λ = 0 one forward+backward."""
        n = float(len(stage.train_members))
        if self.hp.lam == 0.0 or n < 2:  # type: ignore[attr-defined]
            return {"fwd_bwd": n}
        return {"double": n}

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Input-gradient cosines and norms of the final members (eval mode, first 256 report images)."""
        was_training = net.training
        out = gradient_diagnostics(list(net.members), test, device)
        net.train(was_training)
        return out
