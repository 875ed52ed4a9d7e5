"""Baseline: independently initialised members trained together on the same batches.

Each member minimises its own cross-entropy; the total is their sum, so no term couples members
(the reference ensemble every method is compared with; PROTOCOL.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, StepContext, TrainNet


class BaselineHyperparameters(Hyperparameters):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of each member's CE (0 = none)")


@register_method
class Baseline(Method):
    name = "baseline"
    title = "Independent baseline ensemble"
    summary = "Members with independent initialisations, each trained with its own cross-entropy on the same batches."
    Hyperparameters = BaselineHyperparameters
    default_combine = "mean_logits"

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Σ_k CE(f_k(x), y): one mean cross-entropy per member, summed over members."""
        ces = [F.cross_entropy(m(x), y, label_smoothing=self.hp.label_smoothing) for m in net.trainable()]
        terms = {f"ce_{i}": c for i, c in zip(net.stage.train_members, ces, strict=True)}
        return LossOutput(torch.stack(ces).sum(), terms)
