"""Per-method training step: time / the baseline ensemble's step, and time / the method's floor.

The floor is the method's own count of per-member passes (``Method.step_cost``) times the measured
cost of one pass of each kind, plus one optimizer step, all measured in this run on the same
architecture, members and batch (real MNIST images). Target: every method within 1.3x of its floor.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import header, save, table, timeit_auto
from ensemble_core.data import DATASET_INFO, load_dataset, to_float
from ensemble_core.methods import get_method, method_names
from ensemble_core.methods.base import Method, StepContext, TrainNet
from ensemble_core.models import build_model, place
from ensemble_core.spec import TrainSpec

PRIMITIVES = ("fwd", "fwd_bwd", "input_grad", "double")
TARGET = 1.3


def floor_seconds(cost: Mapping[str, float], primitive_s: Mapping[str, float], optimizer_s: float) -> float:
    """The floor of one step: Σ count × seconds per primitive, plus one optimizer step.

    ``cost`` is a ``Method.step_cost`` dict; an unknown primitive name is an error, not a free pass.
    """
    unknown = set(cost) - set(primitive_s)
    if unknown:
        raise KeyError(f"step_cost names unknown primitive(s) {sorted(unknown)}; expected {list(primitive_s)}")
    if any(n < 0 for n in cost.values()):
        raise ValueError(f"step_cost counts must be non-negative: {dict(cost)}")
    return sum(primitive_s[k] * n for k, n in cost.items()) + optimizer_s


def format_cost(cost: Mapping[str, float]) -> str:
    return " ".join(f"{k}×{n:g}" for k, n in cost.items())


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("mnist", "train")
    return to_float(ds.images[:batch]), ds.labels[:batch]


def member_passes(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One member's pass of each primitive of ``Method.step_cost``, as a callable to time."""

    def fwd() -> None:
        with torch.no_grad():
            m(x)

    def fwd_bwd() -> None:
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    def input_grad() -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(m(xi), y), xi)

    def double() -> None:
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(m(xi), y)
        (g,) = torch.autograd.grad(loss, xi, create_graph=True)
        (loss + g.pow(2).sum()).backward()

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "input_grad": input_grad, "double": double}


def primitives(arch: str, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds per pass of one member for each primitive of ``Method.step_cost``."""
    info = DATASET_INFO["mnist"]
    m = place(build_model(arch, mean=info.mean, std=info.std), "cpu")  # the layout training uses
    fns = member_passes(m, x, y)
    return {name: timeit_auto(fns[name], reps) for name in PRIMITIVES}


def step_time(method_name: str, arch: str, members: int, x: torch.Tensor, y: torch.Tensor, reps: int,
              hp: dict[str, Any] | None = None) -> tuple[float, dict[str, float], float, bool]:
    """Seconds per training step of the method's last stage, its step_cost, the optimizer step alone, and
    whether the method counts its own passes (False: it inherits the one-forward+backward default)."""
    spec = TrainSpec.model_validate({"method": method_name, "architecture": arch, "members": members,
                                     "hyperparameters": hp or {}})
    cls = get_method(method_name)
    method = cls.from_spec_dict(spec.hyperparameters, members=members, num_classes=10, dataset="mnist",
                                architecture=arch)
    info = DATASET_INFO["mnist"]
    nets = []
    for k in range(members):
        torch.manual_seed(k)
        nets.append(build_model(arch, mean=info.mean, std=info.std, **method.model_kwargs(arch)))
    rep = getattr(nets[0], "rep", None)
    rep_dim = rep.out_features if isinstance(rep, torch.nn.Linear) else nets[0].feature_dim
    net = place(TrainNet(nets, method.build_aux(nets[0].feature_dim, rep_dim), method), "cpu")
    stage = method.stages()[-1]  # DKD: the last member, with every earlier member frozen
    net.set_stage(stage)
    opt = torch.optim.Adam(list(net.trainable_parameters()), lr=1e-3)
    counter = {"step": 0}

    def step() -> None:
        g = torch.Generator().manual_seed(counter["step"])
        counter["step"] += 1
        ctx = StepContext(0, counter["step"], len(method.stages()) - 1, 0, 1, len(y), 0, g, torch.device("cpu"))
        out = net(x, y, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def opt_only() -> None:
        opt.step()

    t = timeit_auto(step, reps)
    own = type(method).step_cost is not Method.step_cost
    return t, method.step_cost(stage), timeit_auto(opt_only, reps), own


def run(arch: str = "lenet5", members: int = 3, batch: int = 64, reps: int = 5,
        methods: list[str] | None = None) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = _batch(batch)
    prim = primitives(arch, x, y, reps)
    base_t, _, _, _ = step_time("baseline", arch, members, x, y, reps)
    rows = []
    for name in methods or method_names():
        try:
            t, cost, opt_t, own = step_time(name, arch, members, x, y, reps)
        except Exception as e:  # noqa: BLE001 - one method failing must not hide the others' figures
            traceback.print_exc()
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            continue
        floor = floor_seconds(cost, prim, opt_t)
        rows.append({"method": name, "step_ms": 1000 * t, "x_baseline": t / base_t, "floor_ms": 1000 * floor,
                     "x_floor": t / floor, "met": "yes" if t / floor <= TARGET else "NO",
                     "passes": format_cost(cost) + ("" if own else " (default count)")})
    result = {"arch": arch, "members": members, "batch": batch, "reps": reps,
              "primitives_ms": {k: 1000 * v for k, v in prim.items()}, "baseline_step_ms": 1000 * base_t,
              "target_x_floor": TARGET, "rows": rows}
    print(header(f"training step per method ({arch}, {members} members, batch {batch}, real MNIST, fastest of "
                 f"≥{reps} runs filling ~1.5 s; last stage for staged methods; target x_floor <= {TARGET})", load0))
    print("primitives per member (ms): " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in prim.items()))
    print(table(rows, ["method", "step_ms", "x_baseline", "floor_ms", "x_floor", "met", "passes", "error"]))
    save(f"methods-{arch}", result, load0)
    return result
