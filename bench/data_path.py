"""The data path: an epoch's wall time / the pure compute time of its steps (target <= 1.05).

The epoch runs through the real training loop (``train_ensemble``: indexing of in-memory uint8
images, conversion, on-device augmentation, metrics); the compute-only reference runs the same
number of steps on one batch that is already a float tensor.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import header, save, table, timeit_pair
from ensemble_core.data import DATASET_INFO, GlobalBatchLoader, load_dataset, synthetic_dataset
from ensemble_core.models import build_model


def _epoch_ratio(ds: Any, arch: str, members: int, batch: int, augment: bool) -> dict[str, Any]:
    info = ds.info
    nets = [build_model(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, mean=info.mean, std=info.std) for _ in range(members)]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = sum(F.cross_entropy(n(x), y) for n in nets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    loader = GlobalBatchLoader(ds, batch, seed=0, augment=augment)
    steps = len(loader)

    def epoch() -> None:
        for b in loader.epoch(0):
            step(b.x, b.y)

    first = next(loader.epoch(0))
    fixed_x, fixed_y = first.x.clone(), first.y.clone()

    def compute_only() -> None:
        for _ in range(steps):
            step(fixed_x, fixed_y)

    t_epoch, t_compute = timeit_pair(epoch, compute_only, reps=5, warmup=1)
    return {"data": info.name, "images": len(ds), "augment": augment, "steps": steps, "epoch_s": t_epoch,
            "compute_s": t_compute, "ratio": t_epoch / t_compute}


def run(members: int = 3, batch: int = 128, n: int = 2560) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    mnist = load_dataset("mnist", "train").subset(list(range(n)))
    cifar_like = synthetic_dataset(n=n, channels=3, size=32)
    cifar_like.info = DATASET_INFO["cifar10"]
    rows = [_epoch_ratio(mnist, "lenet5", members, batch, augment=False),
            _epoch_ratio(mnist, "lenet5", members, batch, augment=True),
            _epoch_ratio(cifar_like, "lenet5", members, batch, augment=True)]
    print(header(f"data path: epoch wall time / pure compute time (lenet5 × {members}, batch {batch}, fastest of 5, "
                 "interleaved; target <= 1.05)", load0))
    print(table(rows, ["data", "images", "augment", "steps", "epoch_s", "compute_s", "ratio"]))
    result = {"rows": rows}
    save("data-path", result, load0)
    return result
