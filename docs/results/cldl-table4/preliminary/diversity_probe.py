"""How the two CLDL(3,4,4) trainings from the same weights differ inside: member gradient alignment and transfer.

    OMP_NUM_THREADS=1 nice python docs/results/cldl-table4/preliminary/diversity_probe.py

``cldl-3-4-4-s0`` and ``cldl-3-4-4-s0-data1000`` (``ablation.py``) differ by about 15 points of transfer
robustness at PGD ε 0.2 (``README.md``, last section). For each of them, and for ``baseline-s0`` and ``trs-s0`` as
references, on the first 1,000 images of the campaign's seeded transfer slice (the report subset):

- ``grad_abs_cos``: per member pair, the mean over images of |cos| between the members' input gradients of their
  own cross-entropy (what CLDL's ℓ_gd and GAL push down, spec cldl §2.5), and its mean over pairs;
- ``member_transfer``: per ordered pair (i, j), the share of the images both members classify correctly whose
  PGD example crafted on member i alone (CE, L∞ ε 0.2, 10 steps of ε/5, uniform random start, seed 0) also fools
  member j, and its mean over pairs (lower: the members are fooled by different perturbations);
- ``surrogate_fools``: per member, and for the deployed ensemble, the share of its clean-correct images that the
  same PGD crafted on ``surrogate-b3`` (on its log of mean probabilities, PROTOCOL's transfer view) fools: whether
  a training's transfer robustness sits in its members one by one or only in their combination.

Writes ``diversity-probe.json`` beside this file (about a minute, one thread).
"""

from __future__ import annotations

import json
import time
from itertools import combinations, permutations
from pathlib import Path

import torch
import torch.nn.functional as F

from ensemble_core.campaign import Paths, campaign_evaluation_spec, get_campaign
from ensemble_core.checkpoint import load_ensemble
from ensemble_core.data import to_float
from ensemble_core.evaluation.runner import prepare_plan, transfer_view

HERE = Path(__file__).resolve().parent
OUT = HERE / "diversity-probe.json"
UNITS = ("baseline-s0", "trs-s0", "cldl-3-4-4-s0", "cldl-3-4-4-s0-data1000")
N, EPS, STEPS, SEED = 1000, 0.2, 10, 0


def checkpoint(paths: Paths, unit: str) -> Path:
    path = paths.checkpoint(unit)
    return path if path.exists() else HERE / "ablation" / paths.results.name / "checkpoints" / f"{unit}.pt"


def input_grads(member: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image input gradient of the member's own cross-entropy, flattened."""
    xi = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(member(xi), y, reduction="sum"), xi)[0].flatten(1)


def pgd(member: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD-10 with CE on one member, L∞ ε 0.2, step ε/5, uniform random start."""
    g = torch.Generator().manual_seed(SEED)
    adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * EPS).clamp(0, 1)
    for _ in range(STEPS):
        adv = adv.detach().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(member(adv), y, reduction="sum"), adv)[0]
        adv = (x + (adv + EPS / 5 * grad.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
    return adv.detach()


def probe(members: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, ensemble: torch.nn.Module,
          from_surrogate: torch.Tensor) -> dict[str, object]:
    grads = [input_grads(m, x, y) for m in members]
    cos = {f"{i},{j}": float(F.cosine_similarity(grads[i], grads[j], dim=1).abs().mean())
           for i, j in combinations(range(len(members)), 2)}
    with torch.no_grad():
        correct = [m(x).argmax(1) == y for m in members]
    advs = [pgd(m, x, y) for m in members]
    transfer = {}
    with torch.no_grad():
        for i, j in permutations(range(len(members)), 2):
            both = correct[i] & correct[j]
            fooled = members[j](advs[i]).argmax(1) != y
            transfer[f"{i}->{j}"] = float((fooled & both).sum() / both.sum())
    fools = {}
    with torch.no_grad():
        for name, model in [*((str(k), m) for k, m in enumerate(members)), ("ensemble", ensemble)]:
            ok = model(x).argmax(1) == y
            fools[name] = float(((model(from_surrogate).argmax(1) != y) & ok).sum() / ok.sum())
    return {"surrogate_fools": fools, "grad_abs_cos": cos, "grad_abs_cos_mean": sum(cos.values()) / len(cos),
            "member_transfer": transfer, "member_transfer_mean": sum(transfer.values()) / len(transfer),
            "member_clean_acc": [float(c.float().mean()) for c in correct]}


def main() -> None:
    torch.set_num_threads(1)
    c = get_campaign("cldl-table4")
    paths = Paths.of(c)
    first = checkpoint(paths, UNITS[0])
    plan = prepare_plan({**campaign_evaluation_spec("mnist", str(first)), "attacks": []}, first, dataset="mnist",
                        device="cpu", surrogates={"b3": str(paths.checkpoint("surrogate-b3-s100"))})  # the slice
    x, y = to_float(plan.images[plan.in_tr])[:N], plan.labels[plan.in_tr][:N]
    view = transfer_view(plan.surrogates[0].ensemble).eval()
    for p in view.parameters():
        p.requires_grad_(False)
    from_surrogate = pgd(view, x, y)
    out: dict[str, object] = {"n_images": N, "eps": EPS, "steps": STEPS, "seed": SEED, "units": {}}
    t0 = time.time()
    for unit in UNITS:
        members = [m.eval() for m in load_ensemble(checkpoint(paths, unit)).members]
        for m in members:
            for p in m.parameters():
                p.requires_grad_(False)
        ens = load_ensemble(checkpoint(paths, unit)).eval()
        out["units"][unit] = probe(members, x, y, ens, from_surrogate)  # type: ignore[index]
        r = out["units"][unit]  # type: ignore[index]
        print(f"{unit}: |cos| {r['grad_abs_cos_mean']:.4f}, member transfer {r['member_transfer_mean']:.4f}, "
              f"surrogate fools {r['surrogate_fools']}", flush=True)
    out["wall_s"] = round(time.time() - t0, 1)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
