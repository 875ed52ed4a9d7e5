"""Linear ensemble members whose input gradients are known in closed form (shared by method unit tests)."""

from __future__ import annotations

import torch
from torch import nn

from ensemble_core.models import MemberNet


class LinearNet(MemberNet):
    """logits = W·x (x flattened), no bias: ∇_x CE = Wᵀ(softmax(Wx) − e_y) in closed form."""

    def __init__(self, w: list[list[float]]) -> None:
        super().__init__()
        wt = torch.tensor(w)
        self.classifier = nn.Linear(wt.shape[1], wt.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(wt)
        self.feature_dim, self.num_classes = wt.shape[1], wt.shape[0]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1)
