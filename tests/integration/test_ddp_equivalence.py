"""Every method, every stage: one DDP step (2 Ray Train workers, gloo, ``prepare_model``) on a global
batch equals one single-process step on the same batch, to float tolerance.

Both sides build the same members (same seeds), take one plain SGD step (no momentum, no weight decay)
on the first global batch of the stage's first epoch, with the same step generator. The DDP side gives
each rank half the batch (``GlobalBatchLoader`` slices) and lets DDP average the gradients; a method's
randomness comes from ``StepContext.global_rand``/``global_randn``, so it does not depend on the rank
count. All methods and stages run inside ONE ``TorchTrainer.fit()`` (a fit costs 20-30 s here).

Both sides run with oneDNN (mkldnn) and NNPACK off. Both pick convolution kernels by batch size (oneDNN on
AVX-512 CPUs; NNPACK only for batches of 16 or more, when oneDNN is off), so
a sample's input gradient differs in its last bits between a batch of 16 and one of 8; the sign-gradient
attacks inside CCE, ADV-EN, TRS and DVERGE turn a near-zero component's last bits into a whole step of the
adversarial example (measured here: CCE's PGD-10 examples differed in 382 of 37,632 values, by up to 0.40,
with oneDNN on; in none with it off), and the update then differs by about 1e-3. PyTorch's native kernels
compute each sample alone, so the comparison checks the DDP arithmetic, not the kernel choice. Where the
machine has no AVX-512, oneDNN's choice happened not to matter (this test passed there with it on).
Methods are discovered with ``method_names()``, so a new method is checked without editing this file.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from ensemble_core.methods import get_method, method_names

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 16
LR = 0.1
SEED = 1
ATOL = 1e-5


def _spec(name: str, world_size: int) -> Any:
    from ensemble_core.spec import TrainSpec

    members = max(3, get_method(name).min_members)
    return TrainSpec(method=name, dataset="mnist", architecture="lenet5", members=members, epochs=1,
                     batch_size=GLOBAL_BATCH, train_subset=4 * GLOBAL_BATCH, val_size=0, seed=SEED,
                     optimizer={"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0},
                     workers=world_size)


def _cases() -> list[tuple[str, int]]:
    from ensemble_core.spec import TrainSpec

    cases = []
    for name in method_names():
        spec = _spec(name, 1)
        assert isinstance(spec, TrainSpec)
        method = get_method(name).from_spec_dict(spec.hyperparameters, members=spec.members, num_classes=10,
                                                 dataset=spec.dataset, architecture=spec.architecture)
        cases += [(name, i) for i in range(len(method.stages()))]
    return cases


def one_step(name: str, stage_idx: int, rank: int, world_size: int, device: torch.device,
             wrap: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Parameters before and after one SGD step of ``stage_idx`` on the first global batch; the loss terms."""
    from ensemble_core.data import GlobalBatchLoader
    from ensemble_core.methods.base import StepContext
    from ensemble_core.training import make_optimizer, setup_run

    spec = _spec(name, world_size)
    setup = setup_run(spec, device)
    method, net = setup.method, setup.net
    stage = method.stages()[stage_idx]
    net.set_stage(stage)
    before = {k: p.detach().cpu().clone() for k, p in net.named_parameters()}
    optimizer = make_optimizer(method.param_groups(net, spec.optimizer.lr, spec.optimizer.weight_decay),
                               spec.optimizer)
    model = wrap(net, method.find_unused_parameters) if wrap is not None else net
    loader = GlobalBatchLoader(setup.train, spec.batch_size, spec.seed, rank, world_size, device,
                               augment=False)
    batch = next(iter(loader.epoch(stage_idx * 100_000)))
    g = torch.Generator().manual_seed((spec.seed * 1_000_003 + stage_idx * 10_007) * 100_003 + batch.index)
    ctx = StepContext(0, batch.index, stage_idx, rank, world_size, batch.global_size, batch.offset, g, device)
    out = model(batch.x, batch.y, ctx)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    after = {k: p.detach().cpu().clone() for k, p in net.named_parameters()}
    terms = {k: float(v.detach()) for k, v in {"loss": out.loss, **out.terms}.items()}
    return before, after, terms


def _ddp_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Inside each Ray Train worker: every case in turn; rank 0 returns its parameters."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from torch.backends import mkldnn, nnpack  # imported here: cloudpickle cannot pickle them as globals

    mkldnn.enabled = False  # see the module docstring (this process runs only this test's cases)
    nnpack.set_flags(False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    def wrap(net: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        return ray.train.torch.prepare_model(
            net, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    out: dict[str, Any] = {}
    for name, stage_idx in config["cases"]:
        _, after, terms = one_step(name, stage_idx, rank, world, device, wrap)
        flat = torch.cat([p.flatten() for p in after.values()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        # Ray refuses tensors in a train function's return value: numpy arrays
        params = {k: v.numpy() for k, v in after.items()} if rank == 0 else None
        out[f"{name}/{stage_idx}"] = {"params": params, "terms": terms,
                                      "rank_diff": float((gathered[0] - gathered[-1]).abs().max())}
    return out


@pytest.fixture(scope="module")
def ddp_results(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import time

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    trainer = TorchTrainer(_ddp_worker, train_loop_config={"cases": _cases()},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="ddp-equivalence",
                                                storage_path=str(tmp_path_factory.mktemp("ddp"))))
    t0 = time.monotonic()
    result = trainer.fit()
    print(f"\nDDP fit over {len(_cases())} method stages: {time.monotonic() - t0:.1f} s")
    return result.return_value


@pytest.mark.parametrize("name", method_names())
def test_one_ddp_step_equals_one_single_process_step(name: str, ddp_results: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    stages = [s for n, s in _cases() if n == name]
    assert stages
    for stage_idx in stages:
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
            before, single, terms = one_step(name, stage_idx, 0, 1, torch.device("cpu"))  # as in the DDP workers
        ddp = ddp_results[f"{name}/{stage_idx}"]
        assert ddp["rank_diff"] == 0.0  # DDP keeps the two replicas identical
        assert single.keys() == ddp["params"].keys()
        moved = max(float((single[k] - before[k]).abs().max()) for k in single)
        assert moved > 1e-4, f"{name} stage {stage_idx}: the step changed nothing; the comparison is empty"
        diffs = {k: float((single[k] - torch.tensor(ddp["params"][k])).abs().max()) for k in single}
        worst = max(diffs, key=diffs.get)
        print(f"{name} stage {stage_idx}: max |single - DDP| = {diffs[worst]:.2e} ({worst}); "
              f"largest update {moved:.2e}; loss single {terms['loss']:.6f}")
        assert diffs[worst] <= ATOL, (
            f"{name} stage {stage_idx}: DDP step differs from the single-process step by {diffs[worst]:.3e} "
            f"at {worst} (atol {ATOL})")
