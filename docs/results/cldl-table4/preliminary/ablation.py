"""Ablation units of cldl-table4 that are not campaign rows: one training each, resumable, recorded beside this file.

    OMP_NUM_THREADS=1 nice -n 19 python docs/results/cldl-table4/preliminary/ablation.py cldl-3-4-4-s0-data1000

``cldl-3-4-4-s0-data1000``: CLDL(3,4,4) from the seed-0 initial weights (those of every seed-0 target and of
``baseline-s0``) on another data order (``data_seed`` 1000). In the LSD code, ADP, GAL and TRS share their
3-member surrogate's initial weights *and* data order, while CLDL, which builds its label confusion model first,
shares only the weights (``README.md``, "Surrogates that share the targets' initial weights"). Ours gives every
seed-0 row the surrogate's data order; this unit is CLDL as the LSD code's setup has it.

The record goes to ``ablation/cldl-table4/train/<unit>.json`` and the members-only checkpoint to
``ablation/cldl-table4/checkpoints/<unit>.pt``, in the campaign's own formats
(``ensemble_core.campaign.run_train_unit``); the per-epoch checkpoint sits in ``runs/campaign/cldl-table4/<unit>/``,
so a run cut off resumes at its last epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ensemble_core.campaign import Paths, TrainUnit, get_campaign, run_train_unit
from ensemble_core.configurations import train_spec

HERE = Path(__file__).resolve().parent
UNITS = {"cldl-3-4-4-s0-data1000": ("cldl-3-4-4", 0, {"data_seed": 1000})}


def unit(name: str) -> TrainUnit:
    """The ablation unit ``name`` with the campaign's recipe and overrides plus its own."""
    c = get_campaign("cldl-table4")
    config, seed, extra = UNITS[name]
    spec = train_spec(config, recipe_name=c.recipe, seed=seed,
                      overrides={"eval_subset": c.eval_subset, **c.overrides, **extra})
    return TrainUnit(name, c.name, config, seed, "ablation", config, spec)


def paths() -> Paths:
    return Paths.of(get_campaign("cldl-table4"), results_dir=HERE / "ablation")


if __name__ == "__main__":
    import os

    import torch

    os.nice(max(0, 19 - os.nice(0)))
    torch.set_num_threads(1)
    rec = run_train_unit(unit(sys.argv[1]), paths(), commit=False, log=lambda m: print(m, flush=True))
    print(f"{sys.argv[1]}: clean {100 * rec['clean']['acc']:.2f} %", flush=True)
