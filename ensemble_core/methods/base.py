"""The method plug-in interface (shared DESIGN.md, "A method is one file").

A method declares its hyperparameters (pydantic, with the paper's symbols), its stages, any
auxiliary trainable modules, its optimizer groups, its loss for one batch and its inference rule.
The shared training loop (:mod:`ensemble_core.training`) owns devices, DDP, data, schedules,
metrics, checkpoints and resume; nothing outside a method's file branches on its name.

Under DDP the loop wraps a :class:`TrainNet` (members + auxiliary modules) and calls it with a
batch; ``TrainNet.forward`` calls :meth:`Method.loss` on the *unwrapped* module, so adversarial
examples and input gradients computed inside a loss never trigger gradient all-reduces
(``torch.autograd.grad`` with respect to inputs only), and the one ordinary ``backward`` of the
returned loss is what DDP synchronises.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ensemble_core.data import TensorDataset


class Hyperparameters(BaseModel):
    """Base for a method's hyperparameters: unknown keys are errors, every field has a description."""

    model_config = ConfigDict(extra="forbid")


class NoHyperparameters(Hyperparameters):
    pass


@dataclass(frozen=True)
class Stage:
    """One phase of training: which members are optimised and which are used frozen (eval, no grad)."""

    name: str
    train_members: tuple[int, ...]
    frozen_members: tuple[int, ...] = ()
    train_aux: bool = True


@dataclass
class LossOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars for logging (detached by the loop)


@dataclass
class StepContext:
    """What a loss may know about the step besides the batch.

    ``generator`` is seeded identically on every rank for a given (seed, stage, epoch, step), and
    :meth:`global_rand` draws random numbers for the whole global batch and returns this rank's rows,
    so a method's randomness (dropout masks, PGD random starts) does not depend on the worker count.
    """

    epoch: int
    step: int
    stage: int
    rank: int
    world_size: int
    global_batch_size: int
    offset: int
    generator: torch.Generator
    device: torch.device
    training: bool = True
    # the seed of this (run seed, stage, epoch), the same for every step and rank of the epoch (the step's
    # ``generator`` is seeded with ``epoch_seed + step``); None when a caller builds a context by hand
    epoch_seed: int | None = None

    def global_rand(self, local_size: int, *shape: int) -> torch.Tensor:
        """U[0,1) of shape ``(local_size, *shape)``: this rank's rows of one global-batch draw."""
        full = torch.rand((self.global_batch_size, *shape), generator=self.generator)
        return full[self.offset : self.offset + local_size].to(self.device)

    def global_randn(self, local_size: int, *shape: int) -> torch.Tensor:
        full = torch.randn((self.global_batch_size, *shape), generator=self.generator)
        return full[self.offset : self.offset + local_size].to(self.device)


class TrainNet(nn.Module):
    """Everything trainable in one module (what DDP wraps): members plus auxiliary modules."""

    def __init__(self, members: list[nn.Module], aux: dict[str, nn.Module], method: Method) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.aux = nn.ModuleDict(aux)
        self.method = method
        self.stage = Stage("all", tuple(range(len(members))))

    def set_stage(self, stage: Stage) -> None:
        """Freeze everything but the stage's members (and aux modules when the stage trains them)."""
        self.stage = stage
        for i, m in enumerate(self.members):
            m.requires_grad_(i in stage.train_members)
        for a in self.aux.values():
            a.requires_grad_(stage.train_aux)
        self.train()

    def train(self, mode: bool = True) -> TrainNet:
        super().train(mode)
        for i in self.stage.frozen_members:  # frozen members always run in eval mode
            self.members[i].eval()
        return self

    def trainable(self) -> list[nn.Module]:
        return [self.members[i] for i in self.stage.train_members]

    def frozen(self) -> list[nn.Module]:
        return [self.members[i] for i in self.stage.frozen_members]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        return self.method.loss(self, x, y, ctx)


class Method(abc.ABC):
    """Base class of a training method. Subclasses are registered with ``@register_method``."""

    name: ClassVar[str]
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    spec_file: ClassVar[str | None] = None
    Hyperparameters: ClassVar[type[Hyperparameters]] = NoHyperparameters
    default_combine: ClassVar[str] = "mean_logits"
    min_members: ClassVar[int] = 1
    default_members: ClassVar[int] = 3  # a train spec's members when it gives none
    # DDP must search for unused parameters when some trainable parameter gets no gradient in a step.
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, hp: Hyperparameters, *, members: int, num_classes: int, dataset: str,
                 architecture: str) -> None:
        self.hp = hp
        self.n_members = members
        self.num_classes = num_classes
        self.dataset = dataset
        self.architecture = architecture

    @classmethod
    def from_spec_dict(cls, hp: dict[str, Any], **kwargs: Any) -> Method:
        return cls(cls.Hyperparameters.model_validate(hp), **kwargs)

    @classmethod
    def constraints(cls, members: int, hp: dict[str, Any]) -> str | None:
        """A message when the member count or hyperparameters cannot work together, else None."""
        if members < cls.min_members:
            return f"members: {cls.name} needs at least {cls.min_members} members"
        return None

    def model_kwargs(self, architecture: str) -> dict[str, Any]:
        """Extra constructor arguments for the member architecture (e.g. a representation layer)."""
        return {}

    def stages(self) -> list[Stage]:
        """Default: one stage that trains every member simultaneously."""
        return [Stage("all", tuple(range(self.n_members)))]

    def build_aux(self, feature_dim: int, rep_dim: int) -> dict[str, nn.Module]:
        """Auxiliary trainable modules saved in the checkpoint (e.g. CLDL's label confusion model)."""
        return {}

    def param_groups(self, net: TrainNet, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the current stage; default one group of all trainable parameters."""
        return [{"params": list(net.trainable_parameters()), "lr": lr, "weight_decay": weight_decay}]

    @abc.abstractmethod
    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """The method's objective for one batch (this rank's share); returns the scalar and named terms."""

    def combine(self) -> str:
        """The inference rule the method deploys."""
        return self.default_combine

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Method-specific diagnostics computed on the final ensemble (e.g. diversity measures)."""
        return {}

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """The passes one training step of ``stage`` needs, counted in per-member primitives.

        Keys: ``fwd`` (a forward pass), ``fwd_bwd`` (forward + backward to the weights),
        ``input_grad`` (forward + gradient w.r.t. the input only: one attack step) and ``double``
        (forward, input gradient with ``create_graph``, backward through both). ``bench/`` multiplies
        these counts by the measured cost of each primitive to get the method's floor (issue 13).
        Default: one forward+backward per trained member.
        """
        return {"fwd_bwd": float(len(stage.train_members))}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The method with its hyperparameter schema, defaults and meanings (GET /v1/methods)."""
        schema = cls.Hyperparameters.model_json_schema()
        try:  # every default, default factories included, in JSON form
            defaults = cls.Hyperparameters().model_dump(mode="json")
        except ValueError:  # a required hyperparameter: no complete set of defaults
            defaults = {}
        fields = {}
        for fname, f in cls.Hyperparameters.model_fields.items():
            prop = schema.get("properties", {}).get(fname, {})
            fields[fname] = {
                "default": defaults.get(fname),
                "description": f.description or "",
                **{k: prop[k] for k in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                                       "enum", "anyOf") if k in prop},
            }
        return {"name": cls.name, "title": cls.title, "summary": cls.summary, "spec": cls.spec_file,
                "default_combine": cls.default_combine, "min_members": cls.min_members,
                "default_members": cls.default_members,
                "hyperparameters": fields, "schema": schema}
