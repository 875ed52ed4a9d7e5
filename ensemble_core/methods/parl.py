"""PARL: Pairwise Adversarially Robust Loss (arXiv 2112.04948 v1; shared spec ``specs/parl.md``).

All members are trained jointly on

    γ1 · Σ_i CE_i  +  γ2 · Σ_{i<j} Σ_k mean_b cos(∇_x ΣF_k^i(x_b), ∇_x ΣF_k^j(x_b))      (spec §2.4, Eq. 1)

where ``F_k^i`` is the raw (pre-BatchNorm) output of member i's k-th convolution layer (spec §2.3),
``Σ`` sums all of its elements (spec §2.2), and the gradient is taken with respect to the network
input. The maps are computed with ``torch.autograd.grad(create_graph=True)`` (one call per layer,
covering every member at once) and the returned loss is backpropagated once by the shared loop, so
the penalty reaches the conv weights by double backprop (spec §2.5-2.7).

Inference is the paper's majority vote (``vote``: strict majority, no majority = wrong; attacks
differentiate its stated surrogate, the log of the mean softmax). ``vote_tiebreak`` (spec A9) is
registered here as an option, and ``mean_logits`` can be chosen through the train spec's ``combine``.

Batch coupling: every term is a per-sample mean, so W ranks on B/W rows give the one-process
gradient on B rows, *except* through train-mode BatchNorm statistics of the member architecture
(spec A5): lenet5 has no BatchNorm and is exactly DDP-equivalent; ResNets are not, by BN alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.ensemble import CombineRule, VoteInfo, all_members, combine_rule, register_combine, vote_counts
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet

PAPER_K = 7  # "the first seven convolution layers" of ResNet-20 (spec §2.3)


# ------------------------------------------------------------------------------------ inference


def _vote_tiebreak_predict(z: torch.Tensor) -> torch.Tensor:
    """Strict-majority vote; with no majority, the argmax of the mean softmax (spec A9)."""
    counts = vote_counts(z)
    best, label = counts.max(1)
    fallback = z.softmax(-1).mean(0).argmax(1)
    return torch.where(best > z.shape[0] / 2, label, fallback)


register_combine(CombineRule(
    "vote_tiebreak", combine_rule("vote").scores, _vote_tiebreak_predict, differentiable=False,
    outputs="votes", attack_surrogate="log_mean_probs", vote=VoteInfo(all_members, "majority_or_mean"),
    description="strict-majority vote of top-1 labels; without a majority, argmax of the mean softmax "
                "(PARL A9)"))


# ------------------------------------------------------------------------------------------ taps


def _is_train_mode_bn_output(module: nn.Module, output: torch.Tensor) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    if isinstance(module, bn):
        return module.training
    produced_by_bn = output.grad_fn is not None and "BatchNorm" in type(output.grad_fn).__name__
    return produced_by_bn and any(isinstance(m, bn) and m.training for m in module.modules())


class LayerTaps:
    """Forward hooks that keep the outputs of ``modules`` (in the graph, not detached) during one forward.

    A tap whose output is a train-mode BatchNorm output is refused: per channel its batch-and-space
    sum is the constant ``N·H·W·β``, so its input gradient is exactly zero (spec §2.3, A1). A tap
    output modified in place after the hook ran (e.g. by an in-place ReLU) is refused too, since its
    graph would then describe the modified tensor.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self._outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._versions: list[int] = [0] * len(self.modules)
        self._handles: list[Any] = []

    def _hook(self, k: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"tap {k + 1} ({type(module).__name__}) did not return a tensor")
            if _is_train_mode_bn_output(module, output):
                raise ValueError(
                    f"tap {k + 1} ({type(module).__name__}) is a train-mode BatchNorm output, whose summed "
                    "input gradient is exactly zero (PARL spec §2.3): tap the raw conv output before "
                    "BatchNorm")
            if self._outputs[k] is not None:
                raise ValueError(f"tap {k + 1} ({type(module).__name__}) ran twice in one forward pass")
            self._outputs[k] = output
            self._versions[k] = output._version

        return hook

    def __enter__(self) -> LayerTaps:
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def outputs(self) -> list[torch.Tensor]:
        out = []
        for k, t in enumerate(self._outputs):
            name = type(self.modules[k]).__name__
            if t is None:
                raise RuntimeError(f"tap {k + 1} ({name}) did not run in the forward pass")
            if t._version != self._versions[k]:
                raise RuntimeError(f"tap {k + 1} ({name}) output was modified in place after it was tapped "
                                   "(an in-place activation?)")
            out.append(t)
        return out


def tap_modules(member: nn.Module, K: int) -> list[nn.Module]:
    """The first ``K`` convolution modules of ``member`` in forward order (``MemberNet.conv_taps``)."""
    if not hasattr(member, "conv_taps"):
        raise TypeError(f"{type(member).__name__} does not list its convolution layers (conv_taps())")
    taps = member.conv_taps()
    if len(taps) < K:
        raise ValueError(f"hyperparameters.K: K={K} exceeds the {len(taps)} convolution layers of "
                         f"{type(member).__name__}")
    return taps[:K]


def layer_saliency(output: torch.Tensor, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``∇_x Σ_f F(x)_f``, one map per sample (spec §2.2): the VJP of ``output`` with all-ones cotangent."""
    (g,) = torch.autograd.grad(output.sum(), x, create_graph=create_graph)
    return g


def saliency_maps(members: Sequence[nn.Module], x: torch.Tensor, K: int, create_graph: bool = True
                  ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """One forward per member with its first K conv layers tapped; returns (logits, maps).

    ``maps[i][k]`` is ``(B, C·H·W)``: row b is the input gradient of the summed output of member i's
    (k+1)-th conv layer for sample b (spec §2.2-2.3). Every member reads its own leaf copy of the same
    batch, so one ``autograd.grad`` per layer, over all members at once, returns the members' maps
    separately (their graphs do not meet).
    """
    xs = [x.detach().requires_grad_(True) for _ in members]
    logits: list[torch.Tensor] = []
    taps: list[list[torch.Tensor]] = []
    for m, xi in zip(members, xs, strict=True):
        with LayerTaps(tap_modules(m, K)) as t:
            logits.append(m(xi))
        taps.append(t.outputs())
    maps: list[list[torch.Tensor]] = [[] for _ in members]
    for k in range(K):
        total = torch.stack([taps[i][k].sum() for i in range(len(members))]).sum()
        grads = torch.autograd.grad(total, xs, create_graph=create_graph,
                                    retain_graph=create_graph or k < K - 1)
        for i, g in enumerate(grads):
            maps[i].append(g.flatten(1))
    return logits, maps


def pairwise_cosines(maps: Sequence[Sequence[torch.Tensor]], eps: float = 1e-12) -> torch.Tensor:
    """Per-sample signed cosines, ``(P, K, B)`` for the P = N(N-1)/2 pairs i<j in lexicographic order.

    ``cos = <a, b> / max(|a|·|b|, eps)`` (spec §2.4; A23: a zero map gives cosine 0). Norms stay in the
    graph (spec §2.7 rule 3). Half-precision maps are promoted to float32.
    """
    n, K = len(maps), len(maps[0])
    iu = torch.triu_indices(n, n, 1)
    per_layer = []
    for k in range(K):
        m = torch.stack([maps[i][k] for i in range(n)])  # (N, B, D)
        if m.dtype in (torch.float16, torch.bfloat16):
            m = m.float()
        dots = torch.einsum("ibd,jbd->ijb", m, m)  # (N, N, B)
        norms = torch.linalg.vector_norm(m, dim=2)  # (N, B)
        cos = dots / (norms[:, None] * norms[None, :]).clamp_min(eps)
        per_layer.append(cos[iu[0], iu[1]])  # (P, B)
    return torch.stack(per_layer, dim=1)


def parl_penalty(maps: Sequence[Sequence[torch.Tensor]], layer_reduction: str = "sum", eps: float = 1e-12
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_{i<j} R(M_i, M_j)`` with ``R = mean_b Σ_k cos`` (spec §2.4), or the mean over layers (A3).

    Returns the penalty and the ``(P, K)`` batch-mean cosine of every (pair, layer).
    """
    if layer_reduction not in ("sum", "mean"):
        raise ValueError(f"hyperparameters.layer_reduction: expected 'sum' or 'mean', "
                         f"got {layer_reduction!r}")
    cos = pairwise_cosines(maps, eps).mean(2)  # (P, K): the batch mean of each (pair, layer)
    per_pair = cos.sum(1) if layer_reduction == "sum" else cos.mean(1)
    return per_pair.sum(), cos


def linear_cka_from_grams(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) from the n×n Gram matrices of two feature sets (spec §6.3)."""
    n = gx.shape[0]
    h = torch.eye(n, dtype=gx.dtype, device=gx.device) - 1.0 / n
    kx, ky = h @ gx @ h, h @ gy @ h
    return (kx * ky).sum() / (kx.norm() * ky.norm()).clamp_min(1e-30)


@functools.cache
def conv_layer_count(architecture: str) -> int:
    """Number of convolution layers ``conv_taps()`` lists for a registered architecture."""
    from ensemble_core.models import build_model

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return len(build_model(architecture).conv_taps())


# ------------------------------------------------------------------------------------ the method


class PARLHyperparameters(Hyperparameters):
    gamma1: float = Field(1.0, gt=0.0, le=100.0,
                          description="γ1: weight of the members' summed cross-entropy (spec §2.4, Eq. 1)")
    gamma2: float = Field(0.5, ge=0.0, le=100.0,
                          description="γ2: weight of the pairwise layer-gradient cosine penalty (spec §2.4); "
                                      "0 = independent CE training of the members (ENS_U)")
    K: int | None = Field(None, ge=1, le=64, validate_default=True,
                          description="K (the paper's L_H / H): number of leading conv layers whose input "
                                      "gradients are diversified, in forward order (spec §2.3; paper 7 on "
                                      "ResNet-20, ablation 3/5/7); null = 7, or every conv layer when the "
                                      "architecture has fewer (lenet5: 2); at most the architecture's count")
    layer_reduction: Literal["sum", "mean"] = Field(
        "sum", description="combine the K per-layer cosines of a pair by their sum (paper Eq. 1) or mean "
                           "(= γ2/K; spec A3)")
    cos_eps: float = Field(1e-12, gt=0.0, le=1e-3,
                           description="floor of the norm product in each cosine; a zero map contributes 0 "
                                       "(spec A23)")

    @field_validator("K")
    @classmethod
    def _k_fits_architecture(cls, v: int | None, info: ValidationInfo) -> int | None:
        """With the train spec's architecture in the validation context: resolve null and bound K."""
        ctx = info.context if isinstance(info.context, dict) else {}
        arch = ctx.get("architecture")
        if not arch:
            return v
        problem = PARL.architecture_constraints(arch, {"K": v})
        if problem:
            raise ValueError(problem.removeprefix("hyperparameters.K: "))
        return PARL.resolve_K(arch, {"K": v})


@register_method
class PARL(Method):
    name = "parl"
    title = "PARL: pairwise adversarially robust loss"
    summary = ("Members trained jointly on their summed cross-entropy plus the pairwise cosine of the input "
               "gradients of their first K conv layers' summed outputs (double backprop); majority vote.")
    spec_file = "specs/parl.md"
    Hyperparameters = PARLHyperparameters
    default_combine = "vote"
    min_members = 2  # a pairwise penalty needs a pair

    def __init__(self, hp: Hyperparameters, *, members: int, num_classes: int, dataset: str,
                 architecture: str) -> None:
        super().__init__(hp, members=members, num_classes=num_classes, dataset=dataset,
                         architecture=architecture)
        problem = self.architecture_constraints(architecture, hp.model_dump())
        if problem:
            raise ValueError(problem)
        self.K = self.resolve_K(architecture, hp.model_dump())

    @classmethod
    def resolve_K(cls, architecture: str, hp: dict[str, Any]) -> int:
        """The K in force: the given one, or the paper's 7 capped at the architecture's conv count."""
        return int(hp["K"]) if hp.get("K") is not None else min(PAPER_K, conv_layer_count(architecture))

    @classmethod
    def architecture_constraints(cls, architecture: str, hp: dict[str, Any]) -> str | None:
        k = hp.get("K")
        if k is None:
            return None
        n = conv_layer_count(architecture)
        if k > n:
            return (f"hyperparameters.K: K={k} exceeds the {n} convolution layers of architecture "
                    f"{architecture!r}; use K <= {n} (the paper's K=7 is for ResNet-20)")
        return None

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """γ1·Σ_i CE(M_i(x), y) + γ2·Σ_{i<j} Σ_k mean_b cos(∇_x ΣF_k^i, ∇_x ΣF_k^j)  (spec §2.4-2.5, §2.7).

        One forward per member serves both terms (train-mode BN as the loop sets it, spec A5); all
        members see the same batch (§2.7 rule 2); the maps keep their graph (``create_graph=True``) so
        the single ordinary backward of the returned loss reaches every conv weight up to tap K in
        both members of each pair (§2.5). With γ2 = 0 the penalty is not computed and the loss is
        exactly independent CE training (§2.8, ENS_U).
        """
        hp: PARLHyperparameters = self.hp  # type: ignore[assignment]
        members = net.trainable()
        ids = net.stage.train_members
        if hp.gamma2 == 0.0 or len(members) < 2:
            ces = [F.cross_entropy(m(x), y) for m in members]
            ce = torch.stack(ces).sum()
            terms = {"ce": ce, **{f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}}
            return LossOutput(hp.gamma1 * ce, terms)
        logits, maps = saliency_maps(members, x, self.K, create_graph=True)
        ces = [F.cross_entropy(z, y) for z in logits]
        ce = torch.stack(ces).sum()
        penalty, cos = parl_penalty(maps, hp.layer_reduction, hp.cos_eps)
        loss = hp.gamma1 * ce + hp.gamma2 * penalty
        terms: dict[str, torch.Tensor] = {"ce": ce, "penalty": penalty,
                                          **{f"ce_{i}": c for i, c in zip(ids, ces, strict=True)}}
        terms.update(self._cosine_terms(cos.detach(), ids))
        return LossOutput(loss, terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member: one double-backprop pass (one forward serves CE and the K taps; the first input
        gradient with ``create_graph`` and the backward through it). The other K−1 tap gradients run
        through prefixes of the network only and are not counted, so this floor is a lower bound. With
        γ2 = 0 (ENS_U) one forward+backward (issue 13)."""
        n = float(len(stage.train_members))
        hp: PARLHyperparameters = self.hp  # type: ignore[assignment]
        return {"double": n} if hp.gamma2 > 0 and n >= 2 else {"fwd_bwd": n}

    @staticmethod
    def _cosine_terms(cos: torch.Tensor, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Batch-mean cosine per (pair, layer) when few enough, else per layer and per pair (spec §9)."""
        n = len(ids)
        iu = torch.triu_indices(n, n, 1).tolist()
        pairs = [(ids[a], ids[b]) for a, b in zip(iu[0], iu[1], strict=True)]
        P, K = cos.shape
        if P * K <= 64:
            return {f"cos_{i}_{j}_l{k + 1}": cos[p, k] for p, (i, j) in enumerate(pairs) for k in range(K)}
        out = {f"cos_l{k + 1}": cos[:, k].mean() for k in range(K)}
        out.update({f"cos_{i}_{j}": cos[p].mean() for p, (i, j) in enumerate(pairs)})
        return out

    @staticmethod
    def _gram_hook(store: list[torch.Tensor], k: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            f = output.flatten(1).double()  # only the n×n Gram is kept, not the activations
            store[k] = (f @ f.T).cpu()

        return hook

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device, n_images: int = 256
                ) -> dict[str, Any]:
        """Diagnostics on the final ensemble in eval mode, first ``n_images`` report images.

        The batch-mean cosine of every (pair, layer) for the K diversified layers, and the pairwise
        linear CKA of the raw outputs of every conv layer (spec §6.3, Fig. 2/6).
        """
        members = list(net.members)
        n_all = len(members[0].conv_taps())
        sub = test.subset(list(range(min(n_images, len(test)))))
        was_training = net.training
        net.eval()
        cos_sum = torch.zeros(len(members) * (len(members) - 1) // 2, self.K)
        grams = [[torch.zeros(0)] * n_all for _ in members]
        seen = 0
        x_all = torch.cat([xb for xb, _ in iterate_eval(sub, 128, device)])
        for start in range(0, len(sub), 128):
            xb = x_all[start : start + 128]
            with torch.enable_grad():
                _, maps = saliency_maps(members, xb, self.K, create_graph=False)
            cos_sum += pairwise_cosines(maps).sum(2).detach().cpu()
            seen += xb.shape[0]
        with torch.no_grad():
            for i, m in enumerate(members):
                handles = [tap.register_forward_hook(self._gram_hook(grams[i], k))
                           for k, tap in enumerate(m.conv_taps())]
                try:
                    m(x_all)
                finally:
                    for h in handles:
                        h.remove()
        net.train(was_training)
        iu = torch.triu_indices(len(members), len(members), 1).tolist()
        pairs = [f"{a}-{b}" for a, b in zip(iu[0], iu[1], strict=True)]
        cos = cos_sum / max(seen, 1)
        cka = {p: [float(linear_cka_from_grams(grams[a][k], grams[b][k])) for k in range(n_all)]
               for p, a, b in zip(pairs, iu[0], iu[1], strict=True)}
        return {
            "K": self.K,
            "n_images": seen,
            "eval_cosine": {p: [float(c) for c in cos[q]] for q, p in enumerate(pairs)},
            "eval_cosine_mean_per_layer": [float(c) for c in cos.mean(0)],
            "cka_conv_layers": cka,
            "cka_mean_per_pair": {p: sum(v) / len(v) for p, v in cka.items()},
        }
