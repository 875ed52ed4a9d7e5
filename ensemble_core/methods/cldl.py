"""CLDL: conditional label dependency learning with a label confusion model (spec ``cldl.md``).

Wang & Liu, "Adversarial Ensemble Training by Jointly Learning Label Dependencies and Member Models"
(ICIC 2023); reference code ZJLAB-AMMI/LSD ``aa0f3eb`` (``LCM_GAL_Trainer``). N members and one shared
label confusion model (LCM) are trained jointly by one optimiser on

    Loss = ℓ_E − α ℓ_ld + β ℓ_gd                                           (spec §2.6, Eqs. 11–12)

* ℓ_E: mean over members of KL(s_i ‖ p_i), s_i = softmax(γ·onehot(y) + c_i) the LCM's instance-
  dependent soft label for member i and p_i the member's softmax (§2.2–2.3);
* ℓ_ld: Jensen–Shannon diversity of the members' non-target label distributions, *maximised* (§2.4);
* ℓ_gd: mean |cosine| between the members' input-gradients of their KL losses, minimised (§2.5).

Defaults follow the reference code where spec §8 recommends it (§2.9); the paper's forms are switches
(``ld_mode``, ``gd_norm``, ``gd_abs``, ``gd_loss``). See ``docs/methods/cldl.md``.

Distributed training: ℓ_E and ℓ_gd are per-sample means, so DDP on equal shards is the same computation
as one process on the whole batch. The reference-code ℓ_ld is *batch-coupled* (a log-mean-exp of
batch-level JSD means). It is made exact under DDP by summing its per-pair sums across ranks (one
all-reduce of a few detached scalars per step) and back-propagating the global value's gradient
through each rank's own rows (:func:`_globalised`). BatchNorm members (ResNet) remain batch-coupled
through their batch statistics, as for every method.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, model_validator
from torch import nn

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet
from ensemble_core.methods.gal import pairwise_grad_cosines, torch19_product_floor

# Headline (γ, α) per data set (spec §4: MNIST CLDL(3,4,4), F-MNIST (3,2,4), CIFAR-10 (4,2,4)); β = 4 always.
DATASET_DEFAULTS: dict[str, tuple[float, float]] = {
    "mnist": (3.0, 4.0),
    "fashion_mnist": (3.0, 2.0),
    "cifar10": (4.0, 2.0),
    "cifar100": (4.0, 2.0),
    "synthetic": (3.0, 4.0),
}
KL_OFFSET = 1e-6  # log(· + 1e-6) on s and p in the KL [C] (spec §2.3)
JSD_OFFSET = 1e-30  # added to both distributions in the reference JSD [C] (spec §2.4)
LD_OFFSET = 1e-6  # log(mean exp(JSD) + 1e-6) [C] (spec §2.4)
PAPER_FLOOR = 1e-12  # clamp of r_i in paper-mode JSD (spec §2.9)
COS_EPS = 1e-8  # F.cosine_similarity's default eps, as in the code (spec §2.5)


class CLDLHyperparameters(Hyperparameters):
    gamma: float | None = Field(
        None,
        gt=0,
        le=50,
        description="γ: weight of the one-hot label inside the soft label s = softmax(γ·y + c) (spec §2.2); "
        "null = the spec's value for the data set: 3 (MNIST, Fashion-MNIST), 4 (CIFAR)",
    )
    alpha: float | None = Field(
        None,
        ge=0,
        le=100,
        description="α: weight of the soft-label diversity ℓ_ld, maximised (spec §2.4); 0 = ablation; "
        "null = the spec's value for the data set: 4 (MNIST), 2 (Fashion-MNIST, CIFAR)",
    )
    beta: float = Field(
        4.0,
        ge=0,
        le=100,
        description="β: weight of the gradient diversity ℓ_gd, minimised (spec §2.5); "
        "0 = ablation (no double backprop)",
    )
    d: int = Field(
        64,
        ge=2,
        le=4096,
        description="d: width of the member representation v and of the label embedding (spec §2.2, §4); "
        "applied to "
        "lenet5 / resnet20 / resnet18, other architectures feed their last hidden layer as it is",
    )
    ld_mode: Literal["reference", "paper"] = Field(
        "reference",
        description="ℓ_ld form (spec §2.4, A1–A2): 'reference' = the authors' code "
        "(LCV c with the true class masked, "
        "element-mean KL in bits, batch-level log-mean-exp over pairs); 'paper' = Eqs. 8–9 (soft label s "
        "with its arg-max removed, per-sample JSD in nats, per-sample log-mean-exp, batch mean; α needs "
        "re-tuning, the term is ~an order of magnitude smaller)",
    )
    gd_norm: Literal["members", "pairs"] = Field(
        "members",
        description="ℓ_gd normaliser (spec §2.5, A4): 'members' = Σ_pairs / N "
        "(code; 2× the paper's for N=5), "
        "'pairs' = mean over the N(N−1)/2 pairs (paper Eq. 10); identical for N=3",
    )
    gd_abs: bool = Field(
        True,
        description="absolute value of the cosine in ℓ_gd (spec A3: Eq. 10 line 2 and the code); "
        "false = Eq. 10 line 1 (anti-aligned gradients are rewarded)",
    )
    gd_loss: Literal["kl", "ce"] = Field(
        "kl",
        description="loss whose input-gradient enters ℓ_gd (spec A5): "
        "'kl' = KL(s_i‖p_i) with s_i not detached "
        "(paper and code); 'ce' = the member's cross-entropy (commented out in the code)",
    )
    cos_eps: float = Field(
        0.0, ge=0.0, le=1e-2,
        description="ε of the LSD code's F.cosine_similarity (torch <= 1.11: x·y / max(‖x‖‖y‖, ε)) on the input "
                    "gradients of the batch-mean KL: ℓ_gd's cosine becomes g_i·g_j / max(‖g_i‖‖g_j‖, ε·B²) for "
                    "per-sample gradients g and batch B, which shrinks the cosine of samples with small gradients "
                    "(spec §2.5). 0 = the exact cosine (ours); 1e-8 = the LSD code (torch 1.9) behind Table IV",
    )
    activation: Literal["leaky_relu", "relu"] = Field(
        "leaky_relu",
        description="activation of ResNet members (spec §5, A13: LeakyReLU(0.1) for CLDL); "
        "LeNet-5 always uses ReLU",
    )

    @model_validator(mode="after")
    def _dataset_defaults(self, info: ValidationInfo) -> CLDLHyperparameters:
        """Fill γ / α with the spec's values for the data set when the validation context names it."""
        ctx = info.context if isinstance(info.context, dict) else {}
        dataset = ctx.get("dataset")
        if dataset is not None:
            g, a = DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["mnist"])
            if self.gamma is None:
                self.gamma = g
            if self.alpha is None:
                self.alpha = a
        return self


class LabelConfusionModel(nn.Module):
    """The label confusion model LCM(v; θ) → label confusion vector c (spec §2.2, Eq. 6, A8).

    Label encoder: ``L = tanh(Linear_{d→d}(E))`` over the embeddings ``E`` of all C labels (C×d);
    similarity ``z = v Lᵀ`` (B×C); ``c = softmax(Linear_{C→C}(z))``. PyTorch default initialisation [C].
    """

    def __init__(self, num_classes: int, rep_dim: int) -> None:
        super().__init__()
        self.num_classes, self.rep_dim = num_classes, rep_dim
        self.label_embedding = nn.Embedding(num_classes, rep_dim)
        self.label_encoder = nn.Linear(rep_dim, rep_dim)
        self.projection = nn.Linear(num_classes, num_classes)

    def label_representations(self) -> torch.Tensor:
        """Vec^(l) = f^L([l_1..l_C]): one row per label, C×d."""
        return torch.tanh(self.label_encoder(self.label_embedding.weight))

    def forward(self, v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The LCV c = softmax(W (v Vec^(l)ᵀ) + b) for ``v`` (B×d); ``labels`` = Vec^(l) if precomputed."""
        labels = self.label_representations() if labels is None else labels
        return torch.softmax(self.projection(v @ labels.t()), dim=-1)


def soft_labels(c: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """The simulated label distribution s = softmax(γ·onehot(y) + c), not detached (spec §2.2, Eq. 6)."""
    return torch.softmax(c + gamma * F.one_hot(y, c.shape[-1]).to(c.dtype), dim=-1)


def kl_to_soft_labels(s: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ_i = KL(s ‖ p) = Σ s (log(s+1e-6) − log(p+1e-6)), p = softmax(logits) (§2.3, Eq. 7)."""
    p = torch.softmax(logits, dim=-1)
    return (s * (torch.log(s + KL_OFFSET) - torch.log(p + KL_OFFSET))).sum(-1)


def remove_entry(dist_: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Delete column ``index[b]`` of each row b (B×C → B×(C−1)), keeping the order; no renormalisation."""
    keep = ~F.one_hot(index, dist_.shape[-1]).bool()
    return dist_[keep].view(dist_.shape[0], dist_.shape[-1] - 1)


def reference_pair_sums(q: list[torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Per pair, Σ over this batch's rows and columns of P log(P/M) + Q log(Q/M), P = q_i + 1e-30 (§2.4)."""
    out = []
    for i, j in pairs:
        p, r = q[i] + JSD_OFFSET, q[j] + JSD_OFFSET
        log_m = torch.log((p + r) / 2)
        out.append((p * (torch.log(p) - log_m)).sum() + (r * (torch.log(r) - log_m)).sum())
    return torch.stack(out)


def reference_ld_from_sums(sums: torch.Tensor, count: int) -> torch.Tensor:
    """ℓ_ld [C] = log(mean_pairs exp(JSD_ij) + 1e-6), JSD_ij = sums_ij / count / (2 ln 2) (§2.4, items 2–4).

    ``count`` = B·(C−1): ``nn.KLDivLoss()``'s default element-mean over the whole batch.
    """
    jsd = sums / count / (2 * math.log(2))
    return torch.log(jsd.exp().mean() + LD_OFFSET)


def paper_label_diversity(r: list[torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Per-sample ℓ_ld of Eqs. 8–9: log-mean-exp over pairs of JSD(r_i ‖ r_j) in nats, r = s minus arg-max.

    Returns a length-B vector (the batch mean is taken by the caller) (spec §2.4, paper form).
    """
    js = []
    for i, j in pairs:
        p, q = r[i].clamp_min(PAPER_FLOOR), r[j].clamp_min(PAPER_FLOOR)
        log_m = torch.log((p + q) / 2)
        js.append(0.5 * (p * (p.log() - log_m)).sum(-1) + 0.5 * (q * (q.log() - log_m)).sum(-1))
    return torch.logsumexp(torch.stack(js, -1), -1) - math.log(len(pairs))


def pairwise_abs_cos(
    grads: list[torch.Tensor], pairs: list[tuple[int, int]], absolute: bool = True
) -> torch.Tensor:
    """Per pair, the batch mean of (|·|) cos(g_i, g_j) of flattened per-sample input-gradients (spec §2.5)."""
    out = []
    for i, j in pairs:
        cos = F.cosine_similarity(grads[i], grads[j], dim=-1, eps=COS_EPS)
        out.append((cos.abs() if absolute else cos).mean())
    return torch.stack(out)


def pair_cosines(grads: list[torch.Tensor], pairs: list[tuple[int, int]], *, absolute: bool = True,
                 cos_eps: float = 0.0, batch: int = 1) -> torch.Tensor:
    """Per pair, the batch mean of (|·|) cos of per-sample input-gradients (spec §2.5): the exact cosine with
    ``cos_eps`` 0, else torch 1.9's on the batch-mean loss's gradients, ``g_i·g_j / max(‖g_i‖‖g_j‖, ε·B²)``
    (:func:`~ensemble_core.methods.gal.torch19_product_floor`)."""
    if cos_eps <= 0.0:
        return pairwise_abs_cos(grads, pairs, absolute=absolute)
    cos = pairwise_grad_cosines(grads, product_floor=torch19_product_floor(cos_eps, batch))  # (B, P), same order
    return (cos.abs() if absolute else cos).mean(0)


def gradient_diversity(pair_cos: torch.Tensor, n_members: int, norm: str) -> torch.Tensor:
    """ℓ_gd from per-pair mean cosines (spec §2.5).

    'members': Σ_pairs / N (the code); 'pairs': the mean over pairs (paper Eq. 10).
    """
    return pair_cos.sum() / n_members if norm == "members" else pair_cos.mean()


def _globalised(local_sums: torch.Tensor, count_global: int, ld_fn: Any) -> torch.Tensor:
    """Exact DDP form of a loss f(global per-pair sums): value f(S) and this rank's share of ∇f.

    S = Σ_ranks local_sums (one all-reduce of detached scalars). DDP averages the ranks' gradients,
    so rank r back-propagates W · ∂f/∂S(S) · local_sums_r; the mean over ranks is then ∂f/∂θ of the
    whole-batch loss. No collective runs in the backward pass.
    """
    world = dist.get_world_size()
    total = local_sums.detach().clone()
    dist.all_reduce(total)
    leaf = total.requires_grad_(True)
    with torch.enable_grad():
        value = ld_fn(leaf, count_global)
        (weights,) = torch.autograd.grad(value, leaf)
    return value.detach() + world * (weights * (local_sums - local_sums.detach())).sum()


@dataclass
class CLDLTerms:
    l_E: torch.Tensor
    l_ld: torch.Tensor
    l_gd: torch.Tensor | None
    kl: list[torch.Tensor]  # per member, batch mean
    pair_cos: torch.Tensor | None
    true_mass: torch.Tensor  # mean s_y over members and batch (diagnostic)


@register_method
class CLDL(Method):
    name = "cldl"
    title = "CLDL: conditional label dependency learning (label confusion model)"
    summary = (
        "Members fit instance-dependent soft labels from a jointly trained label confusion model (KL), "
        "while the JSD of their non-target label distributions is maximised and the |cosine| of their "
        "input-gradients minimised (Wang & Liu, ICIC 2023)."
    )
    spec_file = "specs/cldl.md"
    Hyperparameters = CLDLHyperparameters
    default_combine = "mean_probs"  # the ensemble averages member softmax outputs (spec §3)
    min_members = 2  # both diversity terms are over member pairs

    def __init__(self, hp: Hyperparameters, **kwargs: Any) -> None:
        super().__init__(hp, **kwargs)
        assert isinstance(hp, CLDLHyperparameters)
        g, a = DATASET_DEFAULTS.get(self.dataset, DATASET_DEFAULTS["mnist"])
        self.hp: CLDLHyperparameters = hp.model_copy(
            update={
                "gamma": g if hp.gamma is None else hp.gamma,
                "alpha": a if hp.alpha is None else hp.alpha,
            }
        )

    @property
    def gamma(self) -> float:
        assert self.hp.gamma is not None
        return float(self.hp.gamma)

    @property
    def alpha(self) -> float:
        assert self.hp.alpha is not None
        return float(self.hp.alpha)

    def model_kwargs(self, architecture: str) -> dict[str, Any]:
        """Members expose the d-wide pre-activation v (spec §2.1, §5); ResNets get Linear(64→d), LeakyReLU."""
        if architecture in ("resnet20", "resnet18"):
            return {"rep_dim": self.hp.d, "activation": self.hp.activation}
        if architecture == "lenet5":
            return {"rep_dim": self.hp.d}
        return {}

    def build_aux(self, feature_dim: int, rep_dim: int) -> dict[str, nn.Module]:
        """One label confusion model shared by all members, consuming their rep_dim-wide v (spec §2.2)."""
        return {"lcm": LabelConfusionModel(self.num_classes, rep_dim)}

    # ------------------------------------------------------------------------------------------ loss

    def compute_terms(
        self,
        net: TrainNet,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        create_graph: bool,
        need_gd: bool,
        global_batch: int | None = None,
        distributed: bool = False,
    ) -> CLDLTerms:
        """Every CLDL term for one batch (Algorithm 1, lines 6–14; spec §2.2–2.5).

        ``create_graph``: keep the input-gradients' graph (training: ℓ_gd is back-propagated, second order).
        ``distributed``: the reference ℓ_ld is summed across ranks (exact under DDP; see :func:`_globalised`).
        """
        hp = self.hp
        members = list(net.members)
        n = len(members)
        pairs = list(itertools.combinations(range(n), 2))
        lcm = net.aux["lcm"]
        labels = lcm.label_representations()  # once per step (spec §2.2, efficient form)
        x = x.detach()
        # One leaf per member: one autograd.grad call then returns every member's own input-gradient.
        xs = [x.clone().requires_grad_(True) if need_gd else x for _ in members]
        kls, cs, ss, gd_losses = [], [], [], []
        for m, xi in zip(members, xs, strict=True):
            parts = m.forward_parts(xi)  # one pass: v (pre-activation) and logits (spec §2.1)
            c = lcm(parts.rep, labels)
            s = soft_labels(c, y, self.gamma)
            kl = kl_to_soft_labels(s, parts.logits)  # per sample
            kls.append(kl)
            cs.append(c)
            ss.append(s)
            if need_gd:
                gd_losses.append(
                    kl if hp.gd_loss == "kl" else F.cross_entropy(parts.logits, y, reduction="none")
                )
        # ℓ_E (spec §2.3): mean over members of the batch-mean KL.
        kl_means = [k.mean() for k in kls]
        l_e = torch.stack(kl_means).mean()

        # ℓ_gd (spec §2.5). Gradients of the per-sample losses' *sum*: each row's gradient is its own
        # ∇_x ℓ_i(x), independent of the batch size (the code's batch mean only rescales by 1/B).
        l_gd, pair_cos = None, None
        if need_gd:
            grads = torch.autograd.grad([gl.sum() for gl in gd_losses], xs, create_graph=create_graph)
            flat = [g.flatten(1) for g in grads]
            pair_cos = pair_cosines(flat, pairs, absolute=hp.gd_abs, cos_eps=hp.cos_eps,
                                    batch=global_batch or x.shape[0])
            l_gd = gradient_diversity(pair_cos, n, hp.gd_norm)

        # ℓ_ld (spec §2.4).
        if hp.ld_mode == "reference":
            q = [remove_entry(c, y) for c in cs]  # LCV with the true-class column masked out
            sums = reference_pair_sums(q, pairs)
            if distributed:
                assert global_batch is not None
                l_ld = _globalised(sums, global_batch * (self.num_classes - 1), reference_ld_from_sums)
            else:
                l_ld = reference_ld_from_sums(sums, x.shape[0] * (self.num_classes - 1))
        else:
            r = [remove_entry(s, s.detach().argmax(-1)) for s in ss]  # arg-max removal (= y when γ > 1)
            l_ld = paper_label_diversity(r, pairs).mean()

        true_mass = torch.stack([s.gather(1, y[:, None]).mean() for s in ss]).mean()
        return CLDLTerms(l_e, l_ld, l_gd, kl_means, pair_cos, true_mass.detach())

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Loss = ℓ_E − α ℓ_ld + β ℓ_gd, batch-averaged (spec §2.6, Algorithm 1 line 16).

        With β = 0 no input-gradient is computed (no double backprop); α = 0 still logs ℓ_ld.
        """
        distributed = (
            ctx.world_size > 1
            and self.hp.ld_mode == "reference"
            and dist.is_available()
            and dist.is_initialized()
        )
        t = self.compute_terms(
            net,
            x,
            y,
            create_graph=True,
            need_gd=self.hp.beta > 0,
            global_batch=ctx.global_batch_size,
            distributed=distributed,
        )
        total = t.l_E - self.alpha * t.l_ld
        terms: dict[str, torch.Tensor] = {"l_E": t.l_E, "l_ld": t.l_ld, "sld_true_mass": t.true_mass}
        if t.l_gd is not None:
            total = total + self.hp.beta * t.l_gd
            terms["l_gd"] = t.l_gd
        for i, k in enumerate(t.kl):
            terms[f"kl_{i}"] = k
        return LossOutput(total, terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per member: one double-backprop pass when β > 0 (ℓ_gd differentiates the input gradients), else
        one forward+backward; the label confusion model is a small shared extra, not counted (issue 13)."""
        n = float(len(stage.train_members))
        return {"double": n} if self.hp.beta > 0 else {"fwd_bwd": n}

    # ----------------------------------------------------------------------------------- diagnostics

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """The CLDL terms of the final ensemble on the first 500 report images (eval mode, first order)."""
        n_img = min(len(test), 500)
        if n_img == 0:
            return {}
        was_training = net.training
        net.eval()
        acc: dict[str, float] = {}
        pair_cos_sum = None
        batches = 0
        with torch.enable_grad():
            for xb, yb in iterate_eval(test.subset(list(range(n_img))), 250, device):
                t = self.compute_terms(net, xb, yb, create_graph=False, need_gd=True)
                for k, v in (
                    ("l_E", t.l_E),
                    ("l_ld", t.l_ld),
                    ("l_gd", t.l_gd),
                    ("sld_true_mass", t.true_mass),
                ):
                    acc[k] = acc.get(k, 0.0) + float(v.detach())  # type: ignore[union-attr]
                pc = t.pair_cos.detach() if t.pair_cos is not None else None
                pair_cos_sum = pc if pair_cos_sum is None else pair_cos_sum + pc
                batches += 1
        net.train(was_training)
        pairs = list(itertools.combinations(range(len(net.members)), 2))
        out: dict[str, Any] = {k: v / batches for k, v in acc.items()}
        if pair_cos_sum is not None:
            out["grad_cos_pairs"] = {
                f"{i}-{j}": float(c) / batches for (i, j), c in zip(pairs, pair_cos_sum, strict=True)
            }
        rep_dim = net.aux["lcm"].rep_dim
        return {
            "cldl_terms_report_first": n_img,
            **out,
            "gamma": self.gamma,
            "alpha": self.alpha,
            "beta": self.hp.beta,
            "ld_mode": self.hp.ld_mode,
            "gd_norm": self.hp.gd_norm,
            "rep_dim": rep_dim,
        }
