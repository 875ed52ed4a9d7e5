"""DDP: training throughput with 2 Ray Train workers / with 1, at the same global batch.

Each configuration is one ``TorchTrainer.fit()`` (gloo on CPUs) of the real training loop
(``train_ensemble`` under ``prepare_model``) on a slice of MNIST. Throughput is images per second of
the epochs' steps (``epoch_time_s``, the loop's own timing of its steps: no start-up, no per-epoch
evaluation); the fastest epoch of each run is used. Both runs share the machine's cores: one worker
gets all of them (as torch threads), two workers get half each.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from bench.common import header, private_ray, save, table

SPEC: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3,
                        "epochs": 2, "batch_size": 256, "train_subset": 4096, "val_size": 0, "eval_subset": 100,
                        "seed": 0}


def _loop(config: dict[str, Any]) -> dict[str, Any]:
    """Body of each Ray Train worker: the shared training loop; returns its epochs' step times (rank 0's
    return value is the result's ``return_value``: Train V2 keeps no metrics reported without a checkpoint)."""
    import ray.train
    import ray.train.torch
    import torch

    from ensemble_core.training import TrainHooks, train_ensemble

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    times: list[float] = []

    def wrap(net: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        if world == 1:
            return net
        return ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    def on_epoch_end(metrics: dict[str, Any], state: Any) -> None:
        times.append(float(metrics["epoch_time_s"]))

    train_ensemble({**config["spec"], "workers": world}, device=torch.device("cpu"), rank=rank, world_size=world,
                   hooks=TrainHooks(wrap=wrap, on_epoch_end=on_epoch_end, log=lambda line: None))
    return {"epoch_times": times, "rank": rank}


def fit(workers: int, spec: dict[str, Any], cores: int) -> dict[str, Any]:
    """One TorchTrainer.fit() with ``workers`` ranks; the step-time figures of rank 0."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # bench/ is not an installed package
    cpus = cores / workers
    storage = tempfile.mkdtemp(prefix="re-bench-ddp-")
    trainer = TorchTrainer(
        _loop, train_loop_config={"spec": spec, "threads": max(1, int(cpus))},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"bench-ddp-{workers}", storage_path=storage))
    try:
        result = trainer.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if result.error is not None:
        raise result.error
    times = list(result.return_value["epoch_times"])
    images = spec["train_subset"]
    return {"workers": workers, "cpus_per_worker": cpus, "threads_per_worker": max(1, int(cpus)),
            "epoch_times_s": [round(t, 3) for t in times], "best_epoch_s": min(times),
            "images_per_s": images / min(times)}


def run(spec: dict[str, Any] | None = None, cores: int = 2) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    spec = dict(spec or SPEC)
    with private_ray(num_cpus=cores):
        rows = [fit(1, spec, cores), fit(2, spec, cores)]
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(header(f"DDP throughput, Ray Train TorchTrainer (gloo), {spec['members']} x {spec['architecture']}, "
                 f"global batch {spec['batch_size']}, {spec['train_subset']} MNIST images per epoch", load0))
    print(table(rows, ["workers", "cpus_per_worker", "threads_per_worker", "epoch_times_s", "images_per_s"]))
    print(f"throughput 2 workers / 1 worker: {ratio:.3f}")
    result = {"spec": spec, "rows": rows, "ratio_2_over_1": ratio}
    save("ddp", result, load0)
    return result
