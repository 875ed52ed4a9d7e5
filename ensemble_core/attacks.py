"""Attack primitives shared by training-time methods (CCE's per-member PGD) and evaluation.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so crafting an
adversarial example never touches parameter ``.grad`` and never triggers a DDP all-reduce.
Evaluation-grade attacks (torchattacks, worst case over restarts, flags) build on these in
``ensemble_core.evaluation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor], torch.Tensor]


def margin_loss(outputs: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per-sample CW margin ``max_{j≠y} o_j - o_y`` clipped below at ``-kappa`` (higher = more adversarial).

    The true class is masked with a large negative constant rather than multiplied by zero, so the
    margin also works when every output is non-positive (log of mean probabilities), where
    ``max((1 - onehot) * outputs)`` would pick a masked zero and carry no gradient.
    """
    true = outputs.gather(1, y[:, None]).squeeze(1)
    masked = outputs.masked_fill(F.one_hot(y, outputs.shape[1]).bool(), -1e9)
    return torch.clamp(masked.max(1).values - true, min=-kappa)


def pgd_linf(loss_fn: LossFn, x: torch.Tensor, eps: float, alpha: float, steps: int,
             init_noise: torch.Tensor | None = None) -> torch.Tensor:
    """L∞ PGD that *maximises* ``loss_fn(x_adv)`` (a scalar, e.g. a sum of per-sample losses).

    ``init_noise`` in ``[-1, 1]`` (same shape as ``x``) gives the random start ``x + eps * noise``;
    ``None`` starts at ``x``. Steps are signed-gradient ascent of size ``alpha``, projected onto the
    eps-ball around ``x`` and onto ``[0, 1]``. The result is detached.
    """
    x = x.detach()
    x_adv = x.clone() if init_noise is None else (x + eps * init_noise.to(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def ce_loss_fn(model: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> LossFn:
    """Summed cross-entropy of ``model`` on labels ``y``: the usual untargeted PGD objective."""
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="sum")


BNMode = Literal["eval", "train"]


@contextmanager
def crafting_mode(modules: Sequence[nn.Module], bn_mode: BNMode = "eval") -> Iterator[None]:
    """Put ``modules`` in the stated mode for crafting training-time adversarial examples, then restore.

    ``"eval"``: every submodule in eval mode (BatchNorm uses its running statistics and does not
    update them, dropout is off). ``"train"``: the modules are put in train mode (BatchNorm uses the
    attacked batch's statistics, dropout is on, as an in-graph Keras attack did) and every BatchNorm's
    running buffers are restored afterwards, so crafting never changes them. On exit each submodule
    gets back exactly the ``training`` flag it had (frozen members stay in eval mode).
    """
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    flags = [(mod, mod.training) for m in modules for mod in m.modules()]
    saved: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    if bn_mode == "train":
        for m in modules:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    saved.append((mod, {k: v.clone() for k, v in mod.named_buffers(recurse=False)}))
    try:
        for m in modules:
            m.train(bn_mode == "train")
        yield
    finally:
        for mod, flag in flags:
            mod.training = flag
        with torch.no_grad():
            for mod, buffers in saved:
                for k, v in buffers.items():
                    getattr(mod, k).copy_(v)


def stacked_member_pgd_linf(members: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
                            y: torch.Tensor, eps: float, alpha: float, steps: int,
                            init_noise: torch.Tensor | None = None) -> torch.Tensor:
    """One untargeted L∞ PGD per member, each on that member alone, run as a single batched PGD.

    The batch is stacked K times; copy k is scored only by member k (summed cross-entropy), so the
    input gradient of copy k is exactly member k's, and one ``autograd.grad`` per step serves every
    member. ``y`` is ``(B,)`` (shared labels) or ``(K, B)`` (per-member labels, e.g. each member's
    own clean prediction); ``init_noise`` in ``[-1, 1]`` has shape ``(K, B, *x.shape[1:])``.
    Returns ``(K, B, *x.shape[1:])``, detached.
    """
    k, b = len(members), x.shape[0]
    shape = x.shape[1:]
    if tuple(y.shape) not in ((b,), (k, b)):
        raise ValueError(f"y must be (B,) or (K, B) = ({k}, {b}), got {tuple(y.shape)}")
    ys = y.expand(k, b) if y.dim() == 1 else y
    stacked = x.detach().unsqueeze(0).expand(k, *x.shape).reshape(k * b, *shape)

    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        zs = z.view(k, b, *shape)
        losses = [F.cross_entropy(m(zs[i]), ys[i], reduction="sum") for i, m in enumerate(members)]
        return torch.stack(losses).sum()

    noise = None if init_noise is None else init_noise.reshape(k * b, *shape)
    return pgd_linf(loss_fn, stacked, eps, alpha, steps, noise).view(k, b, *shape)


def ensemble_log_probs(members: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                       x: torch.Tensor) -> torch.Tensor:
    """``log f^en(x)`` with ``f^en`` the mean of the members' softmax outputs, computed stably."""
    lp = torch.stack([F.log_softmax(m(x), dim=-1) for m in members])
    return torch.logsumexp(lp, dim=0) - math.log(len(members))
