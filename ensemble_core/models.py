"""Member architectures, created by name through a registry.

Every member is a :class:`MemberNet`: it normalises inside the model (so attacks work in [0, 1]),
and one forward pass exposes

* ``rep``: the last hidden layer's pre-activation output (CLDL's ``v``, spec cldl §2.1; for nets
  whose penultimate vector is a pooled map, ``rep`` is that vector),
* ``features``: the penultimate post-activation vector the classifier head reads (DKD's latent
  ``F^j``, PDD's ``h_k``),
* ``logits``.

``head(features)`` maps features to logits, so a method can transform features first (PDD's
dropout). ``conv_taps()`` lists the convolution modules in forward order, so per-layer methods
(PARL) can hook the raw, pre-BatchNorm conv outputs of the first K layers of any architecture.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

_MODELS: dict[str, Callable[..., MemberNet]] = {}


def register_model(name: str) -> Callable[[Callable[..., MemberNet]], Callable[..., MemberNet]]:
    def deco(fn: Callable[..., MemberNet]) -> Callable[..., MemberNet]:
        _MODELS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place(module: ModuleT, device: torch.device | str) -> ModuleT:
    """Move ``module`` to ``device``; on a CPU, also store its convolution weights channels-last.

    Same math, another memory layout: oneDNN's channels-last convolution kernels are faster on a CPU for
    these small nets (``python -m bench conv_layout``, one thread, default / channels-last time of one member's
    pass, 2026-12-07 on the 2-core EPYC: LeNet-5 forward+backward 1.50, input gradient 1.48, double backward
    1.21; DKD's MNIST net 1.15 / 1.15 / 1.03; ResNet-20 1.25 / 1.42 but double backward 0.84, i.e. slower, which
    only CPU runs of TRS on ResNet-20 meet). A 3-member LeNet-5 baseline step of the campaign went from 158 to
    109 ms. On an accelerator the layout is left alone. Float sums come out in another order, so results
    differ from the default layout's in the last bits (max logit difference 4e-8 on LeNet-5), not more."""
    module = module.to(device)
    if torch.device(device).type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,), **kwargs: Any) -> MemberNet:
    """Create a member network by its registered name."""
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(model_names())}")
    net = _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    net.set_normalization(mean, std)
    net.arch_config = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                       "image_size": image_size, "mean": list(mean), "std": list(std), "kwargs": dict(kwargs)}
    return net


@dataclass
class Parts:
    rep: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


class MemberNet(nn.Module, abc.ABC):
    """Base class of every member: normalisation, a body, a representation layer and a linear head."""

    feature_dim: int
    num_classes: int
    arch_config: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 1, 1, 1))
        self.register_buffer("std", torch.ones(1, 1, 1, 1))
        self._taps: list[nn.Module] = []

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @abc.abstractmethod
    def body(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised input → ``rep`` (the last hidden layer before its activation)."""

    def act_rep(self, rep: torch.Tensor) -> torch.Tensor:
        return rep

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features."""
        return self.classifier(features)

    def forward_parts(self, x: torch.Tensor) -> Parts:
        rep = self.body(self.normalize(x))
        features = self.act_rep(rep)
        return Parts(rep, features, self.head(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x).logits

    def conv_taps(self) -> list[nn.Module]:
        """Convolution modules in forward order; hooking one gives its raw (pre-BatchNorm) output."""
        return list(self._taps)


def _flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1])


@register_model("lenet5")
class LeNet5(MemberNet):
    """The CLDL reference 'LeNet-5' (spec cldl §5): conv 20 → 50, 800 → 500 → 64 (= v) → 10, ReLU, no BN."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, rep_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.convs = nn.Sequential(self.conv1, nn.ReLU(), nn.MaxPool2d(2), self.conv2, nn.ReLU(), nn.MaxPool2d(2))
        flat = _flat_size(self.convs, in_channels, image_size)
        self.fc1 = nn.Linear(flat, 500)
        self.rep = nn.Linear(500, rep_dim)
        self.classifier = nn.Linear(rep_dim, num_classes)
        self.feature_dim, self.num_classes = rep_dim, num_classes
        self._taps = [self.conv1, self.conv2]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return self.rep(torch.relu(self.fc1(self.convs(z).flatten(1))))

    def act_rep(self, rep: torch.Tensor) -> torch.Tensor:
        return torch.relu(rep)


@register_model("lenet5_classic")
class LeNet5Classic(MemberNet):
    """LeCun's LeNet-5 layout: conv 6 → 16, 120 → 84 → classes (ReLU, max-pooling)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.convs = nn.Sequential(self.conv1, nn.ReLU(), nn.MaxPool2d(2), self.conv2, nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(_flat_size(self.convs, in_channels, image_size), 120)
        self.rep = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)
        self.feature_dim, self.num_classes = 84, num_classes
        self._taps = [self.conv1, self.conv2]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return self.rep(torch.relu(self.fc1(self.convs(z).flatten(1))))

    def act_rep(self, rep: torch.Tensor) -> torch.Tensor:
        return torch.relu(rep)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)  # never inplace: methods read tensors the activation would overwrite
    raise ValueError(f"unknown activation {name!r}")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, taps: list[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = _activation(act)
        self.shortcut: nn.Module = nn.Identity()
        taps += [self.conv1, self.conv2]
        if stride != 1 or cin != cout:
            sc = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut = nn.Sequential(sc, nn.BatchNorm2d(cout))
            taps.append(sc)  # runs after conv2 in forward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class _ResNet(MemberNet):
    def __init__(self, widths: list[int], blocks: list[int], num_classes: int, in_channels: int,
                 activation: str, rep_dim: int | None, kaiming_init: bool) -> None:
        super().__init__()
        taps: list[nn.Module] = []
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        taps.append(self.stem)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.act = _activation(activation)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, activation, taps))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # CLDL's ResNet-20 puts a Linear(64→64) = v before the head (spec cldl §5); others read the pool.
        self.rep: nn.Module = nn.Linear(cin, rep_dim) if rep_dim else nn.Identity()
        self.has_rep_layer = bool(rep_dim)
        self.feature_dim = rep_dim or cin
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes
        self._taps = taps
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    n_fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, (2.0 / n_fan) ** 0.5)

    def body(self, z: torch.Tensor) -> torch.Tensor:
        out = self.act(self.stem_bn(self.stem(z)))
        return self.rep(self.pool(self.layers(out)).flatten(1))

    def act_rep(self, rep: torch.Tensor) -> torch.Tensor:
        return self.act(rep) if self.has_rep_layer else rep


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, activation: str = "relu",
             rep_dim: int | None = None) -> MemberNet:
    """CIFAR ResNet-20 (3 stages × 3 BasicBlocks, 16/32/64 channels); ``rep_dim=64`` adds CLDL's v layer."""
    return _ResNet([16, 32, 64], [3, 3, 3], num_classes, in_channels, activation, rep_dim, kaiming_init=True)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, activation: str = "relu",
             rep_dim: int | None = None) -> MemberNet:
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool, 64/128/256/512, [2,2,2,2]); PDD spec §3.1."""
    return _ResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_channels, activation, rep_dim,
                   kaiming_init=False)


class _PlainCNN(MemberNet):
    """A stack of ReLU convs / pools, then ReLU FC layers; the last hidden layer is the latent."""

    def __init__(self, conv_spec: list[Any], fc_dims: list[int], num_classes: int, in_channels: int,
                 image_size: int, gap: bool, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        taps: list[nn.Module] = []
        c = in_channels
        for item in conv_spec:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                if dropout:
                    layers.append(nn.Dropout(dropout))
            else:
                out, k, pad = item
                conv = nn.Conv2d(c, out, k, padding=pad)
                taps.append(conv)
                layers += [conv, nn.ReLU()]
                c = out
        if gap:
            layers += [nn.AdaptiveAvgPool2d(1)]
        self.convs = nn.Sequential(*layers)
        flat = _flat_size(self.convs, in_channels, image_size)
        fcs: list[nn.Module] = []
        d = flat
        for i, h in enumerate(fc_dims):
            fcs.append(nn.Linear(d, h))
            if i < len(fc_dims) - 1:
                fcs.append(nn.ReLU())
                if dropout:
                    fcs.append(nn.Dropout(dropout))
            d = h
        self.fcs = nn.Sequential(*fcs)
        self.classifier = nn.Linear(d, num_classes)
        self.feature_dim, self.num_classes = d, num_classes
        self._taps = taps
        self._has_fc = bool(fc_dims)

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return self.fcs(self.convs(z).flatten(1))

    def act_rep(self, rep: torch.Tensor) -> torch.Tensor:
        return torch.relu(rep) if self._has_fc else rep


@register_model("dkd_mnist")
def dkd_mnist(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> MemberNet:
    """DKD spec §5.1 Table I, MNIST: the C&W MNIST net (32,32,M,64,64,M, FC 200, FC 200 = latent)."""
    spec = [(32, 3, 0), (32, 3, 0), "M", (64, 3, 0), (64, 3, 0), "M"]
    return _PlainCNN(spec, [200, 200], num_classes, in_channels, image_size, gap=False, dropout=dropout)


@register_model("dkd_cifar10")
def dkd_cifar10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> MemberNet:
    """DKD spec §5.1 Table I, CIFAR-10: ConvPool-CNN-C style, GAP → 192-d latent → Linear."""
    spec = [(96, 3, 1)] * 3 + ["M"] + [(192, 3, 1)] * 3 + ["M"] + [(192, 3, 1), (192, 1, 0), (192, 1, 0)]
    return _PlainCNN(spec, [], num_classes, in_channels, image_size, gap=True, dropout=dropout)
