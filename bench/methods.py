"""Per-method training step: time / the baseline ensemble's step, and time / the method's floor.

The floor is the method's own count of per-member passes (``Method.step_cost``) times the measured
cost of one pass of each kind, plus one optimizer step, all measured in this run on the same
architecture, members and batch (real MNIST images).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.common import machine, save, table, timeit
from ensemble_core.data import DATASET_INFO, load_dataset, to_float
from ensemble_core.methods import get_method, method_names
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.models import build_model
from ensemble_core.spec import TrainSpec


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("mnist", "train")
    return to_float(ds.images[:batch]), ds.labels[:batch]


def primitives(arch: str, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds per pass of one member for each primitive of ``Method.step_cost``."""
    info = DATASET_INFO["mnist"]
    m = build_model(arch, mean=info.mean, std=info.std)

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

    return {name: timeit(fn, reps) for name, fn in
            (("fwd", fwd), ("fwd_bwd", fwd_bwd), ("input_grad", input_grad), ("double", double))}


def step_time(method_name: str, arch: str, members: int, x: torch.Tensor, y: torch.Tensor, reps: int,
              hp: dict[str, Any] | None = None) -> tuple[float, dict[str, float], float]:
    """Seconds per training step of the method's last stage, its step_cost, and the optimizer step alone."""
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
    net = TrainNet(nets, method.build_aux(nets[0].feature_dim, rep_dim), method)
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

    t = timeit(step, reps)
    return t, method.step_cost(stage), timeit(opt_only, reps)


def run(arch: str = "lenet5", members: int = 3, batch: int = 128, reps: int = 10,
        methods: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = _batch(batch)
    prim = primitives(arch, x, y, reps)
    base_t, _, _ = step_time("baseline", arch, members, x, y, reps)
    rows = []
    for name in methods or method_names():
        t, cost, opt_t = step_time(name, arch, members, x, y, reps)
        floor = sum(prim[k] * n for k, n in cost.items()) + opt_t
        rows.append({"method": name, "step_ms": 1000 * t, "x_baseline": t / base_t, "floor_ms": 1000 * floor,
                     "x_floor": t / floor, "passes": " ".join(f"{k}×{n:g}" for k, n in cost.items())})
    result = {"arch": arch, "members": members, "batch": batch, "primitives_ms": {k: 1000 * v for k, v in prim.items()},
              "baseline_step_ms": 1000 * base_t, "rows": rows}
    print(f"# training step per method ({arch}, {members} members, batch {batch}, real MNIST) — {machine()}")
    print("primitives per member (ms): " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in prim.items()))
    print(table(rows, ["method", "step_ms", "x_baseline", "floor_ms", "x_floor", "passes"]))
    save(f"methods-{arch}", result)
    return result
