"""Does the LSD code's ℓ_gd cosine floor (torch 1.9, max(‖g_i‖‖g_j‖, 1e-8·B²), B = 128) bite on CLDL(3,4,4)?

    OMP_NUM_THREADS=1 nice python docs/results/cldl-table4/preliminary/cos_floor_probe.py

On 1,024 seeded MNIST training images in 8 batches of 128, for the campaign's seed-0 CLDL(3,4,4) at its
initialisation and after training (``../checkpoints/cldl-3-4-4-s0.pt``): the products ‖g_i‖‖g_j‖ of every member
pair's per-sample input gradients of KL(s‖p) (s not detached, as in training), their quantiles, and the fraction
below the floor. Writes ``cos-floor-probe.json`` beside this file (seconds, one thread).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ensemble_core.checkpoint import load_checkpoint
from ensemble_core.data import load_dataset, to_float
from ensemble_core.methods.cldl import kl_to_soft_labels, soft_labels
from ensemble_core.spec import TrainSpec
from ensemble_core.training import setup_run

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "cldl-3-4-4-s0.pt"
B, N_IMAGES, COS_EPS = 128, 1024, 1e-8


def products(net: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖g_i‖‖g_j‖ per sample for the pairs (0,1), (0,2), (1,2), batch by batch of B."""
    lcm, out = net.aux["lcm"], []
    for b0 in range(0, len(x), B):
        xb, yb = x[b0:b0 + B], y[b0:b0 + B]
        norms = []
        for m in net.members:
            xi = xb.clone().requires_grad_(True)
            parts = m.forward_parts(xi)
            s = soft_labels(lcm(parts.rep, lcm.label_representations()), yb, net.method.gamma)
            g = torch.autograd.grad(kl_to_soft_labels(s, parts.logits).sum(), xi)[0]
            norms.append(g.flatten(1).double().norm(dim=1))
        out.append(torch.stack([norms[i] * norms[j] for i, j in ((0, 1), (0, 2), (1, 2))]))
    return torch.cat(out, 1)


def main() -> None:
    torch.set_num_threads(1)
    st = load_checkpoint(CKPT)
    raw = st["spec"]
    spec = TrainSpec.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
    idx = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:N_IMAGES]
    train = load_dataset("mnist", "train")
    x, y = to_float(train.images[idx]), train.labels[idx]
    floor = COS_EPS * B ** 2
    result: dict[str, Any] = {"floor": floor, "batch": B, "n_images": N_IMAGES, "checkpoint": CKPT.name}
    for when in ("initialisation", "trained"):
        net = setup_run(spec, torch.device("cpu")).net  # the seed-0 initial weights
        if when == "trained":
            for m, sd in zip(net.members, st["members"], strict=True):
                m.load_state_dict(sd)
            net.aux["lcm"].load_state_dict(st["aux"]["lcm"])
        net.eval()
        p = products(net, x, y).flatten()
        qs = (0.01, 0.1, 0.5, 0.9)
        result[when] = {"fraction_below_floor": float((p < floor).double().mean()),
                        "quantiles": {str(q): float(v) for q, v in zip(qs, torch.quantile(p, torch.tensor(
                            qs, dtype=torch.double)).tolist(), strict=True)}}
        print(when, result[when], flush=True)
    Path(__file__).with_name("cos-floor-probe.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
