"""DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation of Ensembles (Yang et al., NeurIPS 2020).

Every step, for each member j, a *feature-distilled* image is crafted from each source image x toward
a random other image x_s of the same (global) batch (the paper's feature distillation):

    x'_j = argmin_{‖δ‖∞ ≤ ε, x+δ ∈ [0,1]} ‖f_j^l(x + δ) − f_j^l(x_s)‖²

by sign-gradient descent with the released code's L1-normalised momentum (``distillation.py``:
``Linf_distillation``, μ = 1, no random start). ``f_j^l`` is member j's output of its l-th weighted
layer, l drawn uniformly from 1..depth once per epoch (``random.randint(1, depth)`` in
``train/train_dverge.py``). x'_j looks like x to a human but like x_s to member j: it carries j's
non-robust features of x_s. Member i then learns to classify the *other* members' distilled images
with the source label y (the paper's vulnerability-diversification objective):

    L_i = coeff · Σ_{j≠i} CE(f_i(x'_j), y)   [+ CE(f_i(PGD_i(x)), y) with plus_adv]   [+ CE(f_i(x), y) with plus_clean]

each CE a batch mean, summed over j as in the released code (``loss += criterion(m(distilled_j), sl)``).
The objective of a batch is Σ_i L_i; because the distilled images are constants (crafted with input
gradients only) L_i depends on member i's weights only, so one optimiser with one parameter group per
member takes exactly the steps of the paper's one-optimiser-per-member (see ``param_groups``).
Inference: the mean of the member softmax outputs (the code's ``Ensemble`` = log of the mean softmax).

Settings and their sources are in ``docs/methods/dverge.md`` (CIFAR: ε = 0.07, step 0.007, 10 steps;
shared specs/parl.md §7 and A19, research/anchors.md §1.1; MNIST / Fashion-MNIST: ε = 8/255, step 2/255,
the LSD reference code that produced the published LeNet-5 DVERGE numbers, specs/cldl.md §6.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, model_validator
from torch import nn

from ensemble_core.attacks import crafting_mode, stacked_member_pgd_linf
from ensemble_core.data import TensorDataset, to_float
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet
from ensemble_core.methods.cce import member_forwards, random_start_noise

# (ε, η, source) of the feature distillation per data set.
_DISTILL_DEFAULTS: dict[str, tuple[float, float, str]] = {
    "cifar10": (0.07, 0.007, "[paper/code] DVERGE CIFAR-10: distill eps 0.07, step 0.007 (specs/parl.md A19)"),
    "cifar100": (0.07, 0.007, "[rec] CIFAR-100 not in the paper: the CIFAR-10 setting"),
    "mnist": (8 / 255, 2 / 255, "[code] LSD reference code for MNIST LeNet-5: distill eps 8/255, step 2/255 "
                                "(specs/cldl.md §6.3)"),
    "fashion_mnist": (8 / 255, 2 / 255, "[code] LSD reference code for Fashion-MNIST LeNet-5: distill eps 8/255, "
                                        "step 2/255 (specs/cldl.md §6.3)"),
}
# The plus_adv PGD of both reference codes (DVERGE and LSD `--eps/--adv-eps`, `--alpha`, `--steps`).
_ADV_DEFAULT = (8 / 255, 2 / 255)
# Architectures whose every distillation layer but the last (the logits) is followed directly by a ReLU, so that
# "post-ReLU features" = relu(raw layer output): the LSD LeNet's get_features (layers 1-4 after F.relu).
POST_RELU_ARCHITECTURES = ("lenet5", "lenet5_classic", "dkd_mnist")


def resolve_distillation(dataset: str, eps: float | None, step_size: float | None) -> tuple[float, float, str]:
    """(ε, η, source) of the distillation PGD: explicit values win, else the data set's default."""
    d_eps, d_step, source = _DISTILL_DEFAULTS.get(
        dataset, (8 / 255, 2 / 255, f"[rec] {dataset}: the MNIST-scale setting (eps 8/255, step 2/255)"))
    if eps is not None:
        # an explicit ε keeps the data set's step ratio unless a step is given too
        d_step, d_eps, source = eps * d_step / d_eps, eps, "hyperparameters.eps"
    if step_size is not None:
        d_step, source = step_size, f"{source}; hyperparameters.step_size"
    return d_eps, d_step, source


# ------------------------------------------------------------------------------------------ layers


def distill_layers(member: nn.Module) -> list[nn.Module]:
    """The candidate distillation layers of a member, 1-based index l ↔ element l − 1.

    Every weighted layer in forward order, as DVERGE's ``get_features(x, layer)`` counts them (layer
    ``depth`` = the logits): the convolutions (``MemberNet.conv_taps()``, forward order) and then the
    fully connected layers (``nn.Linear`` in registration order, which is their forward order in every
    registered architecture; ``tests/unit/test_method_dverge.py`` checks it). Each layer's *raw* output
    is used, before BatchNorm and activation (the code's ``before_relu=True``). For ``lenet5`` this is
    conv1, conv2, fc1 (500), rep (64), logits: the LSD LeNet's five layers. A plain module without
    ``conv_taps`` gives its Conv2d and Linear modules in registration order.
    """
    taps = getattr(member, "conv_taps", None)
    if callable(taps):
        convs = list(taps())
        return convs + [m for m in member.modules() if isinstance(m, nn.Linear)]
    return [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def layer_output(member: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The raw output of ``layer`` when ``member`` runs on ``x``; the forward stops there.

    Stopping early (a forward hook raises once the layer has produced its output) is what
    ``get_features`` does by construction, and saves the rest of the network on every distillation
    step. The returned tensor is in the autograd graph of ``x``.
    """
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        raise _Reached(output)

    handle = layer.register_forward_hook(hook)
    try:
        member(x)
    except _Reached as reached:
        return reached.output
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer.__class__.__name__} was not used by the member's forward pass")


def epoch_layer(ctx: StepContext, depth: int) -> int:
    """The distillation layer l ∈ 1..depth of the current epoch (DVERGE: ``random.randint(1, depth)``).

    Drawn from a generator seeded by ``ctx.epoch_seed``, the seed of this (run seed, stage, epoch) that the
    training loop sets: the same for every step of an epoch and on every DDP rank, and a resumed run
    recomputes it. (A hand-built context without it falls back to ``initial_seed() − step``, the same
    value under the loop's seeding of step s's generator with ``epoch_seed + s``.) The value is mixed
    with a constant so the draw is not the step-0 generator's own first number.
    """
    base = ctx.epoch_seed if ctx.epoch_seed is not None else int(ctx.generator.initial_seed()) - int(ctx.step)
    g = torch.Generator().manual_seed((base * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % 2**63)
    return int(torch.randint(1, depth + 1, (), generator=g))


# ------------------------------------------------------------------------------------ distillation


def distill_features(member: nn.Module, layer: nn.Module, x: torch.Tensor, post_relu: bool = False) -> torch.Tensor:
    """The features distillation matches: ``layer``'s raw output (pre-ReLU, DVERGE's ``before_relu=True``), or
    its ReLU (``post_relu``: the LSD LeNet's ``get_features``, which applies ``F.relu`` after conv1, conv2, fc1
    and the 64-d layer whatever ``before_relu`` says). The caller passes ``post_relu`` false for the logits."""
    out = layer_output(member, layer, x)
    return torch.relu(out) if post_relu else out


def feature_distillation(members: list[nn.Module], layers: list[nn.Module], x: torch.Tensor,
                         target: torch.Tensor, eps: float, alpha: float, steps: int, momentum: float = 1.0,
                         init_noise: torch.Tensor | None = None,
                         post_relu: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The feature distillation for every member at once: ``(N, B, *x.shape[1:])`` distilled images, detached.

    Member j moves x toward ``target``'s features at its layer ``layers[j]``: minimise
    Σ_b ‖f_j(x'_b) − f_j(target_b)‖² (summed, so each sample's gradient does not depend on the batch;
    the code's ``MSELoss`` mean differs by a positive factor, which neither the sign step nor the L1
    normalisation sees) with ``steps`` signed steps of ``alpha``, each projected onto the ε-ball
    around x and onto [0, 1]. ``momentum`` μ: the released code's per-sample L1-normalised gradient
    accumulation g ← μ·g + ∇/‖∇‖₁, step along −sign(g) (μ = 0: plain sign descent). ``init_noise``
    in [−1, 1] ``(N, B, ...)``: random start x + ε·noise (off in DVERGE). One ``autograd.grad`` per
    step serves every member (gradients to the inputs only). Also returns the named terms
    ``distill_dist0`` / ``distill_dist`` (mean squared feature distance at the first and last
    iterate evaluated) for logging. ``post_relu``: match the ReLU of each layer's output
    (:func:`distill_features`).
    """
    n = len(members)
    x = x.detach()
    with torch.no_grad():
        goal = [distill_features(m, layer, target, post_relu).detach()
                for m, layer in zip(members, layers, strict=True)]
    xs = [x.clone() if init_noise is None else (x + eps * init_noise[j].to(x)).clamp(0, 1) for j in range(n)]
    acc = [torch.zeros_like(x) for _ in range(n)]
    first = last = torch.zeros((), device=x.device)
    for step in range(steps):
        for z in xs:
            z.requires_grad_(True)
        dists = [(distill_features(m, layer, z, post_relu) - t).pow(2).flatten(1).sum(1)
                 for m, layer, z, t in zip(members, layers, xs, goal, strict=True)]
        total = torch.stack([d.sum() for d in dists]).sum()
        grads = torch.autograd.grad(total, xs)
        with torch.no_grad():
            mean_dist = torch.stack([d.mean() for d in dists]).mean()
            if step == 0:
                first = mean_dist
            last = mean_dist
            new = []
            for j, (z, g) in enumerate(zip(xs, grads, strict=True)):
                if momentum > 0:
                    l1 = g.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
                    acc[j] = momentum * acc[j] + g / l1
                    direction = acc[j]
                else:
                    direction = g
                z = z.detach() - alpha * direction.sign()
                new.append(torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1))
            xs = new
    return torch.stack([z.detach() for z in xs]), {"distill_dist0": first, "distill_dist": last}


def other_image_index(ctx: StepContext, local_size: int) -> torch.Tensor:
    """For each of this rank's rows, the global-batch index of its distillation target x_s.

    Uniform over the *other* images of the global batch: t(b) = (b + 1 + ⌊u_b·(G − 1)⌋) mod G with
    u from :meth:`StepContext.global_rand`, so one process with the whole batch and W ranks with
    slices pair every image with the same target. (The released code pairs each batch with an
    independently shuffled batch of the training set; a uniform other image of the shuffled batch is
    the same distribution without a second loader.)
    """
    g = ctx.global_batch_size
    if g < 2:
        raise ValueError("DVERGE needs a global batch of at least 2 images (a target other than the source)")
    u = ctx.global_rand(local_size)
    rows = torch.arange(ctx.offset, ctx.offset + local_size, device=u.device)
    return (rows + 1 + (u * (g - 1)).long().clamp(max=g - 2)) % g


def gather_global_batch(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The whole global batch on every rank (``all_gather`` of the equal shares); ``x`` itself with one."""
    if ctx.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def cross_training_loss(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The diversification objective from logits: ``logits[i]`` is ``(N − 1, B, C)``, member i on the
    distilled batches x'_j of the *other* members j ≠ i, in increasing j (its own x'_i is never used).

    Returns the ``(N,)`` per-member losses Σ_{j≠i} CE(f_i(x'_j), y) (each CE a batch mean, summed over j
    as in the released code; y = the source images' labels) and member i's accuracy on those images.
    """
    losses, accs = [], []
    for z in logits:
        k = z.shape[0]
        ce = F.cross_entropy(z.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1)
        losses.append(ce.mean(1).sum())
        accs.append((z.detach().argmax(-1) == y).float().mean())
    return torch.stack(losses), torch.stack(accs)


# ------------------------------------------------------------------------------------------- method


class DVERGEHyperparameters(Hyperparameters):
    eps: float | None = Field(None, gt=0, le=1, description=(
        "ε of the feature distillation (L∞ radius in [0, 1] pixels); None = the data set's default: CIFAR 0.07 "
        "(DVERGE paper/code), MNIST and Fashion-MNIST 8/255 (the LSD code behind the published LeNet-5 DVERGE "
        "numbers)"))
    step_size: float | None = Field(None, gt=0, le=1, description=(
        "η, the distillation step; None = the data set's default (CIFAR 0.007, MNIST/Fashion-MNIST 2/255), or "
        "the same ratio × an explicit eps"))
    steps: int = Field(10, ge=1, le=1000, description="distillation PGD iterations (DVERGE: 10)")
    momentum: float = Field(1.0, ge=0, le=10, description=(
        "μ of the distillation's L1-normalised gradient accumulation (released code: mu = 1, momentum on); "
        "0 = plain sign-gradient descent"))
    random_start: bool = Field(False, description="uniform random start in the ε-ball (DVERGE: off)")
    layer: int | None = Field(None, ge=1, le=1000, description=(
        "fixed distillation layer l (1-based over the member's weighted layers in forward order, depth = the "
        "logits; lenet5: 1 conv1, 2 conv2, 3 fc1, 4 rep, 5 logits); None = a random layer per epoch "
        "(DVERGE default; --distill-fixed-layer off)"))
    distill_bn_mode: Literal["eval", "train"] = Field("eval", description=(
        "network mode while distilling: 'eval' = BatchNorm running statistics, no dropout; 'train' = batch "
        "statistics and dropout with running statistics restored (the code crafts in train mode and lets them "
        "update); no effect on lenet5"))
    coeff: float = Field(1.0, gt=0, le=100, description=(
        "weight of the diversification term Σ_{j≠i} CE(f_i(x'_j), y) (the code's --dverge-coeff, applied "
        "when plus_adv is on; 1 otherwise in the code)"))
    plus_adv: bool = Field(False, description=(
        "DVERGE+AT (the code's --plus-adv): add CE(f_i(PGD_i(x)), y), member i's own PGD example"))
    adv_eps: float = Field(_ADV_DEFAULT[0], gt=0, le=1, description=(
        "ε of the plus_adv PGD (both reference codes: 8/255)"))
    adv_step_size: float = Field(_ADV_DEFAULT[1], gt=0, le=1, description=(
        "η of the plus_adv PGD (both reference codes: 2/255)"))
    adv_steps: int = Field(10, ge=1, le=1000, description="iterations of the plus_adv PGD (10, random start)")
    plus_clean: bool = Field(False, description=(
        "add each member's clean CE(f_i(x), y) (this project's variant, not in the paper's code; keeps clean "
        "accuracy when training from scratch)"))
    features: Literal["pre_relu", "post_relu"] = Field("pre_relu", description=(
        "what the distillation matches at layers 1..depth-1: 'pre_relu' = the layer's raw output (DVERGE's code, "
        "before_relu=True); 'post_relu' = its ReLU, as the LSD LeNet's get_features returns whatever before_relu "
        "says (the DVERGE row of CLDL Table IV); the logits are raw either way. post_relu needs an architecture "
        f"whose layers are each followed by a ReLU: {', '.join(POST_RELU_ARCHITECTURES)}"))
    start_from: Literal["scratch", "baseline"] = Field("scratch", description=(
        "'scratch' = DVERGE from random initialisations (the LSD code, used for the published MNIST/F-MNIST "
        "numbers; one stage); 'baseline' = a first stage of independent CE training (the baseline ensemble), "
        "then the DVERGE stage, as the DVERGE code starts from a trained baseline (doubles the epochs)"))

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> DVERGEHyperparameters:
        ctx = info.context if isinstance(info.context, dict) else {}
        arch = ctx.get("architecture")
        if self.features == "post_relu" and arch is not None and arch not in POST_RELU_ARCHITECTURES:
            raise ValueError(f"features: post_relu is defined for {', '.join(POST_RELU_ARCHITECTURES)}, not {arch} "
                             "(its layers are not each followed by a ReLU)")
        if self.eps is not None and self.step_size is not None and self.step_size > self.eps:
            raise ValueError(f"step_size ({self.step_size}) must not exceed eps ({self.eps})")
        if self.adv_step_size > self.adv_eps:
            raise ValueError(f"adv_step_size ({self.adv_step_size}) must not exceed adv_eps ({self.adv_eps})")
        return self


@dataclass(frozen=True)
class Distillation:
    eps: float
    step_size: float
    steps: int
    source: str


@register_method
class DVERGE(Method):
    name = "dverge"
    title = "DVERGE: diversifying vulnerabilities by cross-training on feature-distilled images"
    summary = ("Each member is trained with the source labels on the other members' feature-distilled images "
               "(PGD toward a random other image's features at a random layer per epoch), so the members' "
               "non-robust features differ (Yang et al., NeurIPS 2020).")
    spec_file = None  # no shared spec of its own: specs/parl.md §7/A19 and specs/cldl.md §6.3 give its settings
    Hyperparameters = DVERGEHyperparameters
    default_combine = "mean_probs"
    min_members = 2  # member i needs at least one other member's distilled images
    find_unused_parameters = False  # every trained member's CE reaches all its weights

    def __init__(self, hp: DVERGEHyperparameters, **kwargs: Any) -> None:  # type: ignore[override]
        super().__init__(hp, **kwargs)
        self.hp: DVERGEHyperparameters = hp
        if hp.features == "post_relu" and self.architecture not in POST_RELU_ARCHITECTURES:
            raise ValueError(f"features: post_relu is defined for {', '.join(POST_RELU_ARCHITECTURES)}, "
                             f"not {self.architecture}")
        eps, step, source = resolve_distillation(self.dataset, hp.eps, hp.step_size)
        if step > eps:
            raise ValueError(f"step_size: the resolved distillation step {step} exceeds eps {eps}")
        self.distillation = Distillation(eps, step, hp.steps, source)

    @classmethod
    def constraints(cls, members: int, hp: dict[str, Any]) -> str | None:
        if members < cls.min_members:
            return "members: DVERGE needs at least 2 members (each learns from the others' distilled images)"
        return None

    def stages(self) -> list[Stage]:
        """One DVERGE stage; with ``start_from = baseline`` a baseline CE stage first (the paper's start)."""
        everyone = tuple(range(self.n_members))
        dverge = Stage("dverge", everyone)
        return [Stage("baseline", everyone), dverge] if self.hp.start_from == "baseline" else [dverge]

    def param_groups(self, net: TrainNet, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One group per member: the paper's one optimiser per member, exactly.

        The released code steps member i's own optimiser on L_i after all distilled images of the batch
        are crafted. Here the loop sums L_i and takes one step of one optimiser; since L_i depends on
        member i's weights only, ∂(Σ L)/∂θ_i = ∂L_i/∂θ_i, and SGD/Adam (with weight decay) update each
        parameter from its own gradient and state, so the update of every member is the same as with
        its own optimiser (checked in the unit tests). Separate groups keep the members apart in the
        optimiser state and would allow per-member learning rates.
        """
        return [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}
                for m in net.trainable()]

    def layer_for(self, ctx: StepContext, depth: int) -> int:
        """The distillation layer of this step: the fixed ``layer`` or this epoch's random draw."""
        if self.hp.layer is not None:
            if self.hp.layer > depth:
                raise ValueError(f"layer: {self.hp.layer} exceeds the {depth} distillation layers of "
                                 f"{self.architecture}")
            return self.hp.layer
        return epoch_layer(ctx, depth)

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Baseline stage: Σ_i CE(f_i(x), y). DVERGE stage:

        1. the epoch's layer l and, for each image, a random other image x_s of the global batch;
        2. x'_j for every member j (:func:`feature_distillation`, unwrapped members, ``distill_bn_mode``);
        3. with ``plus_adv``, each member's own PGD example (random start from ``ctx.global_rand``);
        4. Σ_i [coeff·Σ_{j≠i} CE(f_i(x'_j), y) + plus terms], member forwards in train mode.
        """
        members = net.trainable()
        if net.stage.name == "baseline":
            ces = [F.cross_entropy(m(x), y) for m in members]
            terms = {f"ce_{i}": c.detach() for i, c in zip(net.stage.train_members, ces, strict=True)}
            return LossOutput(torch.stack(ces).sum(), terms)
        hp, dist_cfg = self.hp, self.distillation
        n, b = len(members), x.shape[0]
        per_member_layers = [distill_layers(m) for m in members]
        depth = min(len(ls) for ls in per_member_layers)
        layer = self.layer_for(ctx, depth)
        target_idx = other_image_index(ctx, b)
        pool = gather_global_batch(x, ctx)
        if pool.shape[0] != ctx.global_batch_size:
            raise RuntimeError(f"DVERGE needs the global batch ({ctx.global_batch_size} images) to pick targets, "
                               f"got {pool.shape[0]}: run W > 1 ranks under torch.distributed")
        x_target = pool[target_idx]
        noise = random_start_noise(ctx, b, n, tuple(x.shape[1:])) if hp.random_start else None
        post_relu = hp.features == "post_relu" and layer < depth  # the logits are never rectified
        with crafting_mode(members, hp.distill_bn_mode):
            distilled, dterms = feature_distillation(
                members, [ls[layer - 1] for ls in per_member_layers], x, x_target, dist_cfg.eps,
                dist_cfg.step_size, dist_cfg.steps, hp.momentum, noise, post_relu=post_relu)
            x_adv = None
            if hp.plus_adv:
                adv_noise = random_start_noise(ctx, b, n, tuple(x.shape[1:]))
                x_adv = stacked_member_pgd_linf(members, x, y, hp.adv_eps, hp.adv_step_size, hp.adv_steps,
                                                adv_noise)
        batches = list(distilled.unbind(0))
        logits = [member_forwards([m], [batches[j] for j in range(n) if j != i])[0] for i, m in enumerate(members)]
        div, acc_cross = cross_training_loss(logits, y)
        per_member = hp.coeff * div
        terms: dict[str, torch.Tensor] = {"div": div.detach().sum(), "acc_cross_distilled": acc_cross.mean(),
                                          "distill_layer": torch.tensor(float(layer), device=x.device),
                                          **{k: v.detach() for k, v in dterms.items()}}
        if x_adv is not None:
            adv_ce = torch.stack([F.cross_entropy(m(x_adv[i]), y) for i, m in enumerate(members)])
            per_member = per_member + adv_ce
            terms["adv_ce"] = adv_ce.detach().sum()
        if hp.plus_clean:
            clean_ce = torch.stack([F.cross_entropy(m(x), y) for m in members])
            per_member = per_member + clean_ce
            terms["clean_ce"] = clean_ce.detach().sum()
        for i, v in zip(net.stage.train_members, per_member, strict=True):
            terms[f"loss_{i}"] = v.detach()
        return LossOutput(per_member.sum(), terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """Per-member passes of one step (issue 13).

        Baseline stage: one forward+backward per member. DVERGE stage, N members: per member one no-grad
        forward for the target features and ``steps`` input gradients (distillation), then N − 1
        forward+backward passes on the other members' distilled batches; ``plus_adv`` adds ``adv_steps``
        input gradients and one forward+backward per member, ``plus_clean`` one forward+backward per
        member. Distillation passes stop at the epoch's layer, so counting them as full passes makes
        the floor an upper bound for that part (exact when the layer is the logits).
        """
        n = float(len(stage.train_members))
        if stage.name == "baseline":
            return {"fwd_bwd": n}
        hp = self.hp
        cost = {"fwd": n, "input_grad": n * hp.steps, "fwd_bwd": n * (n - 1)}
        if hp.plus_adv:
            cost["input_grad"] += n * hp.adv_steps
            cost["fwd_bwd"] += n
        if hp.plus_clean:
            cost["fwd_bwd"] += n
        return cost

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """The resolved distillation setting and the layers' names, and the members' cross accuracy on
        each other's distilled images for the first 500 report images (layer = depth, i.e. the logits,
        targets paired as in training with a fixed seed): a direct view of the diversified vulnerability."""
        members = list(net.members)
        layers = [distill_layers(m) for m in members]
        depth = min(len(ls) for ls in layers)
        out: dict[str, Any] = {
            "distillation": {"eps": self.distillation.eps, "step_size": self.distillation.step_size,
                             "steps": self.distillation.steps, "momentum": self.hp.momentum,
                             "random_start": self.hp.random_start, "source": self.distillation.source,
                             "layer": self.hp.layer if self.hp.layer is not None else "random per epoch",
                             "depth": depth,
                             "layers": [f"{i + 1}:{type(m).__name__}" for i, m in enumerate(layers[0])]},
            "start_from": self.hp.start_from, "plus_adv": self.hp.plus_adv, "plus_clean": self.hp.plus_clean,
            "features": self.hp.features,
        }
        n_img = min(len(test), 500)
        if n_img < 2:
            return out
        x, y = to_float(test.images[:n_img].to(device)), test.labels[:n_img].to(device)
        g = torch.Generator().manual_seed(0)
        t = (torch.arange(n_img) + 1 + torch.randint(0, n_img - 1, (n_img,), generator=g)) % n_img
        with crafting_mode(members, "eval"):
            distilled, _ = feature_distillation(members, [ls[depth - 1] for ls in layers], x, x[t.to(device)],
                                                self.distillation.eps, self.distillation.step_size,
                                                self.distillation.steps, self.hp.momentum)
            with torch.no_grad():
                acc = [[float((m(distilled[j]).argmax(-1) == y).float().mean()) for m in members]
                       for j in range(len(members))]
        out["distilled_accuracy"] = {
            "images": n_img, "layer": depth,
            "matrix": acc,  # [j][i]: member i's accuracy (source labels) on member j's distilled images
            "mean_cross": float(sum(acc[j][i] for j in range(len(acc)) for i in range(len(acc)) if i != j)
                                / max(len(acc) * (len(acc) - 1), 1)),
        }
        return out


__all__ = ["DVERGE", "DVERGEHyperparameters", "cross_training_loss", "distill_layers", "epoch_layer",
           "feature_distillation", "layer_output", "other_image_index", "resolve_distillation"]
