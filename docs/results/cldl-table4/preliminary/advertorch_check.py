"""Cross-check of our transfer attacks against AdverTorch, the library behind Table IV (spec cldl §6.1).

The preliminary seed-0 table (``README.md``) puts CLDL(3,4,4) 14 points below the paper at PGD ε 0.2, and GAL and
TRS above it. This asks whether the gap sits in the evaluation (our torchattacks-based attacks against the
AdverTorch classes the LSD code calls) or in the trained models: it crafts the paper's 12 transfer sets per attack
with AdverTorch 0.2.3 on the same two baseline surrogates (`surrogate-b3`, `surrogate-b5`), on the same seeded
2,000-image slice, and scores the same seed-0 targets with the paper's metric (per image, all 12 copies correct,
among the target's clean-correct images). Our cells come from ``seed0-baseline-surrogates.json`` (``run.py``).

AdverTorch is not a project dependency (0.2.3, 2020, imports a helper torch 2 removed): install it beside the
project for this check only, then run::

    pip install --no-deps --target /tmp/advertorch advertorch==0.2.3
    PYTHONPATH=/tmp/advertorch OMP_NUM_THREADS=1 nice python \\
        docs/results/cldl-table4/preliminary/advertorch_check.py 0.2[,0.15,...]

It writes ``advertorch-check.json`` beside this file (merged per ε with what is there). A second argument replaces
the surrogates, e.g. ``0.2 surrogate-b3=baseline-s0`` (a surrogate that shares the seed-0 targets' initial weights,
as the LSD code's do), ``0.2 surrogate-b3=surrogate-b3-s100``, or ``0.2 surrogate-b3=surrogate-b5-s101[:3]`` (the
first three members of a unit: another independent 3-member baseline, as a control); those entries are keyed
``"<ε> <units>"``. A third argument replaces the targets, e.g. ``0.2 surrogate-b3=baseline-s0,surrogate-b5=lsd-b5-s0
cldl-3-4-4-s0-data1000`` (a unit of ``ablation.py``; its checkpoint is looked up beside this file's ablation records
when the campaign has no unit of that name); such entries get `` → <targets>`` added to their key.

Attack parameters, spec cldl §6.1 (our own reading of the spec, not the LSD code): untargeted, L∞, clipped to
[0,1], on the surrogate's ``log(mean softmax)``; FGSM (GradientSignAttack), BIM (LinfBasicIterativeAttack), MIM
(LinfMomentumIterativeAttack, decay 1.0), PGD (LinfPGDAttack, uniform random start), 10 iterations with step ε/5;
losses cross-entropy (batch mean, as the LSD code's ``nn.CrossEntropyLoss()``; the sign steps and MIM's L1
normalisation make the scale irrelevant), the CW margin on the log-probabilities, ``−Σ relu(z_y − max_{k≠y} z_k +
κ)`` with κ = 0.1, and the CW loss as the LSD code evaluates it (``cw_lsd_loss``); every attack under
``torch.manual_seed(j)``, j = 0, 1, 2 (only PGD is random, so the other attacks' three copies are the same and are
crafted once).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ensemble_core.campaign import Paths, campaign_evaluation_spec, get_campaign
from ensemble_core.checkpoint import load_ensemble
from ensemble_core.data import to_float
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation.runner import deployed_predict, load_model, prepare_plan, transfer_view

OUT = Path(__file__).with_name("advertorch-check.json")
OURS = Path(__file__).with_name("seed0-baseline-surrogates.json")
TARGETS = ("baseline-s0", "adp-s0", "gal-s0", "trs-s0", "cldl-3-4-4-s0", "cldl-3-2-1-s0")
SURROGATES = (("surrogate-b3", "surrogate-b3-s100"), ("surrogate-b5", "surrogate-b5-s101"))
KAPPA = 0.1
BATCH = 200  # the LSD code's surrogate.py batch


def cw_margin_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−Σ_i relu(z_{i,y} − max_{k≠y} z_{i,k} + κ), the spec's CW loss (§6.1), maximised by the attack."""
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return -torch.relu(true - other + KAPPA).sum()


def cw_lsd_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CW loss as the LSD code evaluates it (our reading of ``eval/surrogate.py``): its "wrong" term is the
    maximum of ``(1 − onehot(y)) · z``, i.e. of z with the true class's entry set to 0. On log-probabilities every
    other entry is negative, so that maximum is 0 and the loss is −Σ relu(log p_y + κ): it stops pulling once the
    surrogate's p_y < e^−κ ≈ 0.905. Not a margin attack."""
    true = z.gather(1, y[:, None]).squeeze(1)
    wrong = ((1.0 - nn.functional.one_hot(y, z.shape[1]).to(z.dtype)) * z).amax(1)
    return -torch.relu(true - wrong + KAPPA).sum()


LOSSES = {"ce": nn.CrossEntropyLoss(), "cw": cw_margin_loss, "cw-lsd": cw_lsd_loss}
COMBOS = {"ce": ("ce",), "cw": ("cw",), "cw-lsd": ("cw-lsd",), "ce+cw": ("ce", "cw"), "ce+cw-lsd": ("ce", "cw-lsd")}
FAMILIES = ("fgsm", "bim", "mim", "pgd")


def _attacks(view: nn.Module, eps: float, loss: str) -> dict[str, Any]:
    gc = importlib.import_module("torch.autograd.gradcheck")  # the module (the package attribute is the function)
    if not hasattr(gc, "zero_gradients"):  # advertorch 0.2.3 imports it; torch >= 1.9 dropped it, unused here
        gc.zero_gradients = lambda x: None  # type: ignore[attr-defined]
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        # advertorch imports it for its JPEG defence only
        tv = types.ModuleType("torchvision")
        tv.transforms = types.SimpleNamespace(ToPILImage=lambda: None, ToTensor=lambda: None)  # type: ignore[attr-defined]
        sys.modules["torchvision"] = tv
    from advertorch.attacks import (
        GradientSignAttack,
        LinfBasicIterativeAttack,
        LinfMomentumIterativeAttack,
        LinfPGDAttack,
    )

    common = {"loss_fn": LOSSES[loss], "eps": eps, "clip_min": 0.0, "clip_max": 1.0, "targeted": False}
    it = {"nb_iter": 10, "eps_iter": eps / 5}
    return {"fgsm": GradientSignAttack(view, **common),
            "bim": LinfBasicIterativeAttack(view, **common, **it),
            "mim": LinfMomentumIterativeAttack(view, **common, **it, decay_factor=1.0),
            "pgd": LinfPGDAttack(view, **common, **it, rand_init=True)}


def _surrogate(paths: Paths, unit: str) -> Any:
    """A unit's checkpoint path, or, for ``unit[:k]``, an ensemble of its first k members (e.g. the first three
    members of the 5-member baseline: an independent 3-member baseline, since baseline members train alone)."""
    if "[:" not in unit:
        return str(paths.checkpoint(unit))
    name, k = unit[:-1].split("[:")
    ens = load_ensemble(paths.checkpoint(name))
    return Ensemble(list(ens.members)[:int(k)], combine=ens.combine)


def target_checkpoint(paths: Paths, unit: str) -> Path:
    """A campaign unit's members-only checkpoint, or an ablation unit's (``ablation.py``) when the campaign has none."""
    path = paths.checkpoint(unit)
    if path.exists():
        return path
    ablation = Path(__file__).with_name("ablation") / paths.results.name / "checkpoints" / f"{unit}.pt"
    if ablation.exists():
        return ablation
    raise FileNotFoundError(f"no checkpoint for {unit!r}: neither {path} nor {ablation}")


def main(eps_list: list[float], surrogates: tuple[tuple[str, str], ...] = SURROGATES,
         target_units: tuple[str, ...] = TARGETS) -> None:
    """Score every target (but a surrogate) under AdverTorch's transfer sets from ``surrogates`` (name, unit)."""
    torch.set_num_threads(1)
    c = get_campaign("cldl-table4")
    paths = Paths.of(c)
    ckpt = {u: target_checkpoint(paths, u) for u in target_units if u not in dict(surrogates).values()}
    first = next(iter(ckpt))
    spec = {**campaign_evaluation_spec("mnist", str(ckpt[first])), "attacks": []}
    surs = {n: _surrogate(paths, u) for n, u in surrogates}
    plan = prepare_plan(spec, ckpt[first], surrogates=surs, dataset="mnist", device="cpu")
    x = to_float(plan.images[plan.in_tr])
    y = plan.labels[plan.in_tr]
    targets = {u: load_model(str(p), u).ensemble.eval() for u, p in ckpt.items()}
    with torch.no_grad():
        clean = {u: deployed_predict(t, x) == y for u, t in targets.items()}
    done = json.loads(OUT.read_text()) if OUT.exists() else {}
    ours = json.loads(OURS.read_text())
    for eps in eps_list:
        t0 = time.time()
        # per target, family and loss: images robust to every copy of that loss (both surrogates, 3 seeds)
        robust = {u: {f: {lo: torch.ones_like(y, dtype=torch.bool) for lo in LOSSES} for f in FAMILIES}
                  for u in ckpt}
        for s in plan.surrogates:
            view = transfer_view(s.ensemble).eval()
            for p in view.parameters():
                p.requires_grad_(False)
            for loss in LOSSES:
                for fam, atk in _attacks(view, eps, loss).items():
                    for j in range(3 if fam == "pgd" else 1):
                        torch.manual_seed(j)
                        adv = torch.cat([atk.perturb(x[i:i + BATCH], y[i:i + BATCH]).detach()
                                         for i in range(0, len(x), BATCH)])
                        assert float((adv - x).abs().max()) <= eps + 1e-6
                        with torch.no_grad():
                            for u, t in targets.items():
                                robust[u][fam][loss] &= deployed_predict(t, adv) == y
                print(f"  {eps:g} {s.name} {loss}: {time.time() - t0:.0f} s", flush=True)
        cells: dict[str, Any] = {}
        for u in ckpt:
            n_cc = int(clean[u].sum())
            cells[u] = {"n_clean_correct": n_cc, "clean_acc": round(float(clean[u].float().mean()), 6)}
            for fam in FAMILIES:
                cell: dict[str, Any] = {}
                if surrogates == SURROGATES and target_units == TARGETS:  # our cell, same surrogates (run.py)
                    mine = next(r for r in ours[u]["records"] if str(r["attack"]).startswith(fam) and r["eps"] == eps)
                    cell = {"ours": round(100 * mine["robust_acc_among_correct"], 2),
                            "ours_n_clean_correct": mine["n_clean_correct"]}
                for name, parts in COMBOS.items():
                    ok = clean[u].clone()
                    for lo in parts:
                        ok &= robust[u][fam][lo]
                    cell[f"advertorch {name}"] = round(100 * int(ok.sum()) / n_cc, 2)
                cells[u][fam] = cell
            print(eps, u, cells[u]["pgd"], flush=True)
        key = f"{eps:g}" if surrogates == SURROGATES else f"{eps:g} " + "+".join(u for _, u in surrogates)
        if target_units != TARGETS:
            key += " → " + "+".join(target_units)
        done[key] = {"wall_s": round(time.time() - t0, 1), "n_images": len(x), "cells": cells,
                            "advertorch": "0.2.3", "torch": torch.__version__, "batch": BATCH,
                            "surrogates": dict(surrogates)}
        OUT.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sur = tuple(tuple(p.split("=", 1)) for p in sys.argv[2].split(",")) if len(sys.argv) > 2 else SURROGATES
    tgt = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else TARGETS
    main([float(e) for e in sys.argv[1].split(",")], sur, tgt)  # type: ignore[arg-type]
