"""GPU pinning without GPUs: Ray is told it has two (logical) GPUs, and each Ray Train worker built from
a GPU train spec must hold exactly one GPU id of its own, with ``CUDA_VISIBLE_DEVICES`` set by Ray.

The real check runs in a subprocess with its own ``ray.init(num_gpus=2)`` (the session's Ray has no
GPUs). The train loop only inspects what Ray gave it; it never touches CUDA, so the process group
uses gloo here (NCCL, which ``torch_config_for`` picks for GPU specs, needs real CUDA devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers.ray_train import scaling_config_for, torch_config_for, validate_train_spec

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from pathlib import Path

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.ray_train import scaling_config_for, validate_train_spec

    out = Path(sys.argv[1])
    # Ray's socket paths must stay under 108 bytes: a short temp dir of its own
    ray.init(num_cpus=2, num_gpus=2, _temp_dir=tempfile.mkdtemp(prefix="re-gpu-"), log_to_driver=False,
             configure_logging=False)

    def loop(config):
        ctx = ray.train.get_context()
        info = {
            "rank": ctx.get_world_rank(),
            "local_rank": ctx.get_local_rank(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "accelerator_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(ray.train.torch.get_device()),
        }
        (Path(config["out"]) / f"rank{info['rank']}.json").write_text(json.dumps(info))

    spec = validate_train_spec({"workers": 2, "use_gpu": True, "batch_size": 64})
    TorchTrainer(loop, train_loop_config={"out": str(out)}, scaling_config=scaling_config_for(spec, cpus=1),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="gpu-pinning", storage_path=str(out / "storage"))).fit()
    ray.shutdown()
    """
)


def test_gpu_specs_ask_for_one_gpu_per_worker_and_nccl() -> None:
    gpu = validate_train_spec({"workers": 3, "use_gpu": True, "batch_size": 60})
    sc = scaling_config_for(gpu, cpus=2)
    assert sc.num_workers == 3 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert torch_config_for(gpu).backend == "nccl"
    cpu = validate_train_spec({"workers": 2, "batch_size": 64})
    sc = scaling_config_for(cpu, cpus=1)
    assert not sc.use_gpu and sc.resources_per_worker == {"CPU": 1}
    assert torch_config_for(cpu).backend == "gloo"


@pytest.mark.integration
def test_each_ray_train_worker_gets_exactly_one_gpu_id_from_ray(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    infos = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)),
                   key=lambda i: i["rank"])
    own = [i["gpu_ids"] for i in infos]
    assert all(len(ids) == 1 for ids in own), own  # exactly one GPU each
    assert own[0] != own[1] and {own[0][0], own[1][0]} == {"0", "1"}  # distinct ids of the two GPUs
    for info in infos:
        assert info["accelerator_ids"] == info["gpu_ids"]
        # Ray Train shares the node's GPU ids with its workers (so NCCL can reach the peers); the worker's
        # own id is in the list.
        visible = info["cuda_visible_devices"].split(",")
        assert sorted(visible) == ["0", "1"]
        assert info["gpu_ids"][0] in visible
        # the device the train loop uses: its own GPU's position among the visible ones (decided by Ray
        # from the ids alone; nothing here touches CUDA)
        assert info["device"] == f"cuda:{visible.index(info['gpu_ids'][0])}"
    assert infos[0]["device"] != infos[1]["device"]
