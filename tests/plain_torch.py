"""An ensemble member written in plain torch, as someone outside this project would (not our model classes).

Its layers are ``lenet5``'s (``ensemble_core.models``) by name and shape, so its ``state_dict`` saved with
safetensors is a valid upload of that architecture; tests check that the registry turns it into the same function.
Imported by the registry's unit and integration tests (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081  # the MNIST normalisation this plain model applies to [0, 1] pixels itself


class PlainLeNet(nn.Module):
    """conv 20 -> 50 (5x5, ReLU, 2x2 max-pool), 800 -> 500 -> 64 -> classes, ReLU between."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.rep = nn.Linear(500, 64)
        self.classifier = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.rep(F.relu(self.fc1(x.flatten(1))))))


def plain(seed: int) -> PlainLeNet:
    """A freshly initialised member (seeded), in eval mode."""
    torch.manual_seed(seed)
    return PlainLeNet().eval()


def train_plain(seed: int, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 150, batch: int = 64,
                lr: float = 0.05) -> PlainLeNet:
    """A member trained with a plain SGD loop (momentum 0.9) on ``images`` in [0, 1]."""
    torch.manual_seed(seed)
    net = PlainLeNet()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
