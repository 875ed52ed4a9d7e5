"""TRS: transferability reduced smooth ensemble (Yang, Li, Xu, Zuo, Chen, Zhou, Rubinstein, Zhang, Li,
NeurIPS 2021, "TRS: Transferability reduced ensemble via promoting gradient diversity and model
smoothness", arXiv 2104.00671). Documentation: ``docs/methods/trs.md``.

All members are trained jointly on

    Σ_i CE_i(x)  +  λ_a · mean_{i<j} mean_b |cos(∇_x ℓ_i(x_b), ∇_x ℓ_j(x_b))|  +  λ_b · mean_i mean_b s(g_i(x̃_b))

as the authors' released trainer (``train/Empirical/trainer.py::TRS_Trainer``) computes it, with
λ_a = scale·coeff and λ_b = scale·lamda (their defaults 5·2 = 10 each):

* the similarity term is the batch mean of the absolute cosine between the members' per-sample input
  gradients, averaged over the member pairs (the code hard-codes ``(cos01 + cos02 + cos12) / 3``);
* the smoothness term is the released ``Magnitude`` ``s(g) = 2·‖g‖²`` of the input gradient ``g`` of the
  *batch-mean* CE (so per-sample gradients divided by the global batch size B), averaged over members, at
  points x̃: the first half of the global batch is clean, the second half is moved by a 6-step L∞ PGD
  (random start, step δ/3) that *maximises* the members' summed gradient magnitude, with δ growing
  linearly from ``init_eps`` (0.1) to ``adv_eps`` (0.2) over the run's epochs (the code's ``--plus-adv``
  mode, which its training-script generator enables).

``smooth_norm = l2`` and ``grad_scale = per_sample`` give the paper's wording (‖∇_x ℓ_i‖₂ of each sample's
own loss) instead. The PGD points are constants (detached); the similarity and smoothness terms reach the
weights by double backprop. Inference: the mean of the members' softmax outputs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from ensemble_core.attacks import crafting_mode, pgd_linf
from ensemble_core.data import TensorDataset
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet
from ensemble_core.methods.gal import (
    gradient_diagnostics,
    member_input_gradients,
    pairwise_grad_cosines,
    reduce_ce,
    torch19_product_floor,
)

L2_FLOOR = 1e-30  # ‖g‖₂ = sqrt(max(‖g‖², floor)): finite derivatives at an exactly zero gradient


class TRSHyperparameters(Hyperparameters):
    lambda_a: float = Field(10.0, ge=0.0, le=10_000.0,
                            description="λ_a: weight of the mean pairwise |cos| of the members' input gradients "
                                        "(released code: scale·coeff = 5·2)")
    lambda_b: float = Field(10.0, ge=0.0, le=10_000.0,
                            description="λ_b: weight of the smoothness (input-gradient magnitude) term "
                                        "(released code: scale·lamda = 5·2); 0 = no smoothness term, no PGD")
    smooth_norm: Literal["squared", "l2"] = Field(
        "squared", description="smoothness s(g): squared = 2·‖g‖₂² (the released code's Magnitude, factor 2 "
                               "included); l2 = ‖g‖₂ (the paper's wording)")
    grad_scale: Literal["batch_mean", "per_sample"] = Field(
        "batch_mean", description="g in the smoothness term: the input gradient of the batch-mean CE, i.e. each "
                                  "sample's gradient divided by the global batch size (released code), or of "
                                  "each sample's own CE (per_sample). The cosine does not depend on it")
    smooth_points: Literal["half_pgd", "pgd", "clean"] = Field(
        "half_pgd", description="where the smoothness is measured: half_pgd = first half of the global batch "
                                "clean, second half PGD-perturbed (released code with --plus-adv); pgd = every "
                                "sample perturbed; clean = the clean batch (released code without --plus-adv)")
    init_eps: float = Field(0.1, ge=0.0, le=1.0,
                            description="δ at the first epoch: L∞ radius of the smoothness PGD, in [0, 1] pixel "
                                        "units (released code default 0.1)")
    adv_eps: float = Field(0.2, ge=0.0, le=1.0,
                           description="δ reached at the end of annealing (released code default 0.2; MNIST-scale)")
    anneal_epochs: int | None = Field(
        None, ge=1, le=100_000, validate_default=True,
        description="epochs over which δ grows linearly from init_eps to adv_eps (δ_e = init + (adv − init)·"
                    "min(e, E)/E for 0-based epoch e); null = the train spec's epochs, as in the released code "
                    "(filled in when a spec is validated; 1 when no spec is known)")
    pgd_steps: int = Field(6, ge=1, le=100, description="signed-gradient steps of the smoothness PGD (code: 6)")
    pgd_step_ratio: float = Field(1.0 / 3.0, gt=0.0, le=1.0,
                                  description="PGD step size as a fraction of δ (code: δ/3)")
    craft_bn_mode: Literal["train", "eval"] = Field(
        "train", description="mode of the members while crafting the PGD points: train (released code; "
                             "BatchNorm running statistics are restored afterwards) or eval")
    ce_reduction: Literal["sum", "mean"] = Field(
        "sum", description="members' CEs summed (released code) or averaged (the LSD re-implementation)")
    cos_eps: float = Field(
        0.0, ge=0.0, le=1e-2,
        description="ε of the reference codes' F.cosine_similarity (torch <= 1.11: x·y / max(‖x‖‖y‖, ε)) on the input "
                    "gradients of the batch-mean CE: the similarity's denominator becomes max(‖g_i‖‖g_j‖, ε·B²) for "
                    "per-sample gradients g and global batch B. 0 = the exact cosine (ours); 1e-8 = the LSD code "
                    "(torch 1.9) behind CLDL Table IV")

    @field_validator("anneal_epochs")
    @classmethod
    def _epochs_from_spec(cls, v: int | None, info: ValidationInfo) -> int | None:
        """With a train spec in the validation context, null becomes the spec's epochs."""
        ctx = info.context if isinstance(info.context, dict) else {}
        if v is None and isinstance(ctx.get("epochs"), int):
            return int(ctx["epochs"])
        return v

    @model_validator(mode="after")
    def _eps_order(self) -> TRSHyperparameters:
        if self.adv_eps < self.init_eps:
            raise ValueError(f"adv_eps ({self.adv_eps}) must be >= init_eps ({self.init_eps}): δ grows from "
                             "init_eps to adv_eps")
        return self


def smooth_eps(hp: TRSHyperparameters, epoch: int) -> float:
    """δ of 0-based ``epoch``: ``init + (adv − init)·min(epoch, E)/E`` (the code's ``cureps`` when E = epochs)."""
    e_total = hp.anneal_epochs or 1
    return hp.init_eps + (hp.adv_eps - hp.init_eps) * min(epoch, e_total) / e_total


def smoothness_per_sample(grads: list[torch.Tensor], norm: str, scale: float) -> torch.Tensor:
    """``s(scale·g)`` for every member and sample: ``(N, B)``; ``squared`` = 2‖·‖², ``l2`` = ‖·‖₂."""
    g = torch.stack(grads) * scale  # (N, B, D)
    sq = g.pow(2).sum(-1)
    if norm == "squared":
        return 2.0 * sq
    if norm == "l2":
        return sq.clamp_min(L2_FLOOR).sqrt()
    raise ValueError(f"hyperparameters.smooth_norm: expected 'squared' or 'l2', got {norm!r}")


def perturbed_rows(ctx: StepContext, local: int, points: str) -> torch.Tensor:
    """Boolean ``(local,)``: the rows of this rank moved by PGD (global index ≥ B/2 for ``half_pgd``)."""
    idx = torch.arange(ctx.offset, ctx.offset + local)
    if points == "half_pgd":
        return idx >= ctx.global_batch_size // 2
    if points == "pgd":
        return torch.ones(local, dtype=torch.bool)
    return torch.zeros(local, dtype=torch.bool)


def smoothness_pgd(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                   steps: int, noise: torch.Tensor | None, norm: str) -> torch.Tensor:
    """L∞ PGD maximising ``Σ_i Σ_b s(∇_x ℓ_i(x_b))``: the members' summed input-gradient magnitude.

    Per sample this is the code's objective up to a positive factor, so the signed steps are the same. The
    gradients are taken with ``create_graph`` (the objective is itself a gradient); the result is detached.
    """
    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        copies = [x_adv * 1.0 for _ in members]  # one graph node per member: separate input gradients
        total = torch.stack([F.cross_entropy(m(c), y, reduction="sum")
                             for m, c in zip(members, copies, strict=True)]).sum()
        grads = torch.autograd.grad(total, copies, create_graph=True)
        return smoothness_per_sample([g.flatten(1) for g in grads], norm, 1.0).sum()

    return pgd_linf(objective, x, eps, alpha, steps, noise)


@register_method
class TRS(Method):
    name = "trs"
    title = "TRS: transferability reduced smooth ensemble"
    summary = ("Members trained jointly on their cross-entropies plus λ_a times the mean pairwise |cos| of their "
               "input gradients plus λ_b times their input-gradient magnitude at PGD-perturbed points (double "
               "backprop; released-code form by default); mean of softmax outputs. Yang et al. 2021.")
    Hyperparameters = TRSHyperparameters
    default_combine = "mean_probs"
    min_members = 2  # a pairwise similarity needs a pair

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """CE + λ_a·similarity + λ_b·smoothness (module docstring).

        The clean rows of the smoothness term reuse the clean input gradients of the similarity term; the
        perturbed rows (chosen by global index, so independent of the rank count) get one more forward and
        input gradient at their PGD point. PGD noise comes from ``ctx.global_rand``.
        """
        hp: TRSHyperparameters = self.hp  # type: ignore[assignment]
        members = net.trainable()
        ids = net.stage.train_members
        if (hp.lambda_a == 0.0 and hp.lambda_b == 0.0) or len(members) < 2:
            ces = torch.stack([F.cross_entropy(m(x), y) for m in members])
            ce = reduce_ce(ces, hp.ce_reduction)
            return LossOutput(ce, {"ce": ce, **{f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}})
        logits, grads = member_input_gradients(members, x, y, create_graph=True)
        ces = torch.stack([F.cross_entropy(z, y) for z in logits])
        ce = reduce_ce(ces, hp.ce_reduction)
        cos = pairwise_grad_cosines(grads, product_floor=torch19_product_floor(hp.cos_eps, ctx.global_batch_size))
        similarity = cos.abs().mean()
        loss = ce + hp.lambda_a * similarity
        terms: dict[str, torch.Tensor] = {"ce": ce, "similarity": similarity, "grad_cos": cos.detach().mean(),
                                          **{f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}}
        if hp.lambda_b > 0.0:
            smooth, eps = self._smoothness(members, x, y, grads, ctx)
            loss = loss + hp.lambda_b * smooth
            terms["smoothness"] = smooth
            terms["eps"] = torch.tensor(eps, device=x.device)
        return LossOutput(loss, terms)

    def _smoothness(self, members: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                    clean_grads: list[torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, float]:
        """``mean_i mean_b s(g_i(x̃_b))`` over this rank's rows, and the δ used."""
        hp: TRSHyperparameters = self.hp  # type: ignore[assignment]
        scale = 1.0 / ctx.global_batch_size if hp.grad_scale == "batch_mean" else 1.0
        per = smoothness_per_sample(clean_grads, hp.smooth_norm, scale)  # (N, B) at the clean points
        eps = smooth_eps(hp, ctx.epoch)
        if hp.smooth_points == "clean":
            return per.mean(), eps
        local = x.shape[0]
        # drawn for the whole global batch whatever the rows used: the same noise at any rank count
        noise = ctx.global_rand(local, *x.shape[1:]).mul(2.0).sub(1.0).to(x.dtype)
        rows = perturbed_rows(ctx, local, hp.smooth_points).to(x.device)
        if not bool(rows.any()) or eps == 0.0:
            return per.mean(), eps
        xr, yr = x[rows], y[rows]
        with crafting_mode(members, hp.craft_bn_mode):
            x_adv = smoothness_pgd(members, xr, yr, eps, eps * hp.pgd_step_ratio, hp.pgd_steps, noise[rows],
                                   hp.smooth_norm)
        _, adv_grads = member_input_gradients(members, x_adv, yr, create_graph=True)
        per_adv = smoothness_per_sample(adv_grads, hp.smooth_norm, scale)
        per = per.clone()
        per[:, rows] = per_adv  # perturbed rows: their PGD points replace the clean ones
        return per.mean(), eps

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member: one double-backprop pass on the clean batch (similarity, clean smoothness rows);
        with λ_b > 0 and PGD points, ``pgd_steps`` double-backprop passes (each PGD step differentiates an
        input-gradient norm) and one more double pass, on the perturbed fraction of the batch (½ for
        half_pgd)."""
        hp: TRSHyperparameters = self.hp  # type: ignore[assignment]
        n = float(len(stage.train_members))
        if (hp.lambda_a == 0.0 and hp.lambda_b == 0.0) or n < 2:
            return {"fwd_bwd": n}
        frac = {"half_pgd": 0.5, "pgd": 1.0, "clean": 0.0}[hp.smooth_points] if hp.lambda_b > 0.0 else 0.0
        return {"double": n * (1.0 + frac * (hp.pgd_steps + 1))}

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Input-gradient cosines and norms of the final members (eval mode, first 256 report images)."""
        was_training = net.training
        out = gradient_diagnostics(list(net.members), test, device)
        net.train(was_training)
        return out
