"""Resumable experiment campaigns: a declared grid of (configuration, data set, training seed) units.

    python -m ensemble_core.campaign cldl-table4 --phase train --commit   # or: robust-ensembles campaign ...
    python -m ensemble_core.campaign cldl-table4 --status
    python -m ensemble_core.campaign cldl-table4 --phase eval             # after training, any machine
    python -m ensemble_core.campaign cldl-table4 --report                 # docs/results/<name>/README.md

A campaign names its rows (named configurations, :mod:`ensemble_core.configurations`), one training
recipe, its training seeds, its transfer surrogates and the paper's table it is compared with. It is
split into *units*:

* a **training unit** trains one ensemble (``runs/campaign/<name>/<unit>/``, a checkpoint every epoch, so
  an interrupted unit resumes from its last epoch) and, once finished, writes its record
  ``docs/results/<name>/train/<unit>.json`` and its members-only checkpoint
  ``docs/results/<name>/checkpoints/<unit>.pt`` into the repository (``--commit`` commits exactly these
  two files). A later session, from a fresh clone without ``runs/``, re-evaluates from them without
  retraining; a unit whose record exists (same declared spec) is skipped.
* an **evaluation unit** attacks one trained target with the campaign's surrogates (the 3- and 5-member
  baselines, and a same-method surrogate: the row's own configuration with the next training seed). Its
  record ``docs/results/<name>/eval/<unit>.json`` is keyed by a fingerprint of the evaluation code, the
  evaluation spec and the checkpoints' hashes: changed evaluation code re-runs the evaluation, never the
  training.

Work in progress lives in ``runs/`` (ignored by git). ``--park`` copies every unfinished unit's latest state
(a training unit's last epoch checkpoint with its optimizer state, an evaluation unit's per-example state) into
``docs/results/<name>/in-progress/`` (committed with ``--commit``); a later run on a fresh clone resumes from
there when ``runs/`` has nothing, and the unit's own commit removes its parked files. Run it before a working
session ends, so that the end of a session loses nothing, not even the unit in progress.

Order: seed 0 of every row (and the surrogates) first, cheapest first; then the other seeds row by row,
cheapest row first, so that each row's seeds (and with them its evaluations, which need the next seed as the
same-method surrogate) complete as early as they can; a unit with work in progress goes first. One progress
line per unit with an ETA. The same grid runs on a GPU (``--device auto``); the device never enters a
unit's key. Records hold per-example outcomes compressed (packed bits, base64).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble_core.configurations import configuration, recipe, train_spec

TRAIN_FORMAT = "robust-ensembles/campaign-train-v1"
EVAL_FORMAT = "robust-ensembles/campaign-eval-v1"
# Per-step cost of each counted primitive relative to one member's forward+backward (``Method.step_cost``),
# calibrated on this project's 2-core CPU measurements (issue 21: 3 x LeNet-5 baseline step 41 ms; GAL,
# CLDL about 3x; TRS with half-PGD points about 12x; DVERGE about 16x).
COST_WEIGHTS = {"fwd": 1 / 3, "fwd_bwd": 1.0, "input_grad": 1.3, "double": 3.0}
PRIOR_S_PER_COST = 0.041 / 3  # seconds per unit of cost on that CPU, one thread
# Forward cost of an architecture relative to lenet5 (multiply-adds of one image: lenet5 2.3 M, dkd_mnist 9.9 M,
# lenet5_classic 0.4 M); the step costs above are for a batch of 128.
ARCH_COST = {"lenet5": 1.0, "dkd_mnist": 4.3, "lenet5_classic": 0.2}
# The evaluation code whose change re-runs evaluation units (and only them).
EVAL_CODE = ("ensemble_core/evaluation", "ensemble_core/attacks.py", "ensemble_core/ensemble.py")


# ------------------------------------------------------------------------------------------ declaration


@dataclass(frozen=True)
class Row:
    """One row of the paper's table: a named configuration, the paper's column it is compared with."""

    key: str
    configuration: str
    label: str
    paper_column: str | None = None


@dataclass(frozen=True)
class SurrogateDecl:
    """A surrogate of every target: a configuration trained at ``seed``, or, with ``seed=None``, at each target's
    own seed (seed-matched: it starts from the target's initial weights, as the LSD code's surrogates do). A
    seed-matched surrogate whose training spec is a row's at that seed is that row's unit, and is not used
    against itself."""

    key: str
    configuration: str
    seed: int | None
    group: str = "baseline"  # the evaluation's per-group transfer worst case
    data_seed_offset: int | None = None  # seed-matched only: train with data_seed = seed + offset (other data)

    def label(self, seed: int) -> str:
        return f"{self.key} (seed {seed})"

    @property
    def seed_text(self) -> str:
        if self.seed is not None:
            return f"seed {self.seed}"
        return "the target's own seed" + ("" if self.data_seed_offset is None
                                           else f", data_seed = seed + {self.data_seed_offset}")


@dataclass(frozen=True)
class Campaign:
    name: str
    title: str
    recipe: str
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    surrogates: tuple[SurrogateDecl, ...]
    same_method_surrogate: bool = True
    eval_subset: int = 9000  # clean accuracy of every unit on the whole report subset
    overrides: dict[str, Any] = field(default_factory=dict)  # train-spec fields replacing the recipe's
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's table: see CLDL_TABLE_IV
    paper_group: str = "baseline"  # the surrogate group whose worst case is set against the paper's figures
    paper_denominator: str = "clean_correct"  # the paper's figures: among clean-correct images, or "all"
    extra_transfer_attacks: tuple[dict[str, Any], ...] = ()  # beside PROTOCOL's transfer set (a paper's own)
    notes: tuple[str, ...] = ()
    whitebox_seeds: tuple[int, ...] | None = None  # targets of these seeds get the white-box suite (None: all)


@dataclass(frozen=True)
class TrainUnit:
    id: str
    campaign: str
    configuration: str
    seed: int
    role: str  # "target" or "surrogate"
    row: str
    spec: dict[str, Any]  # declared (unresolved) train spec

    @property
    def digest(self) -> str:
        return digest(self.spec)


@dataclass(frozen=True)
class EvalUnit:
    id: str
    target: TrainUnit
    surrogates: tuple[tuple[str, TrainUnit], ...]  # (name shown in the records, unit)
    groups: dict[str, str] = field(default_factory=dict)  # surrogate name -> group
    paper_group: str = "baseline"
    extra_transfer_attacks: tuple[dict[str, Any], ...] = ()
    whitebox: bool = True  # False: transfer attacks only (the campaign's ``whitebox_seeds``)


# CLDL Table IV (spec cldl §7): MNIST, N = 3 LeNet-5, transfer robust accuracy (%) among clean-correct images,
# worst case over 2 surrogates x 2 losses x 3 seeds, 9,000-image report subset.
_T4 = {
    "ADP": {"BIM": [90.18, 60.38, 23.23, 5.32], "FGSM": [93.29, 79.58, 52.99, 27.38],
            "MIM": [90.21, 63.05, 24.69, 5.58], "PGD": [89.66, 56.83, 19.42, 3.06]},
    "GAL": {"BIM": [87.34, 55.61, 28.5, 11.06], "FGSM": [90.77, 69.94, 47.35, 30.13],
            "MIM": [85.82, 53.72, 27.49, 10.64], "PGD": [84.87, 47.69, 21.69, 6.44]},
    "DVERGE": {"BIM": [90.24, 61.21, 21.17, 2.53], "FGSM": [93.51, 80.75, 55.98, 27.78],
               "MIM": [90.52, 63.67, 23.88, 3.16], "PGD": [89.82, 57.86, 17.32, 1.05]},
    "TRS": {"BIM": [92.5, 76.63, 46.16, 17.42], "FGSM": [94.55, 86.21, 70.64, 48.1],
            "MIM": [92.31, 76.81, 46.83, 16.58], "PGD": [91.91, 73.01, 39.19, 11.71]},
    "CLDL(3,4,4)": {"BIM": [94.48, 85.64, 65.11, 32.81], "FGSM": [95.43, 89.82, 78.39, 57.51],
                    "MIM": [94.25, 85.31, 65.1, 30.44], "PGD": [93.75, 83.5, 58.94, 24.81]},
    "CLDL(3,2,1)": {"BIM": [94.22, 81.42, 51.59, 22.95], "FGSM": [95.5, 88.56, 72.73, 46.77],
                    "MIM": [94.07, 81.56, 51.33, 21.34], "PGD": [93.84, 78.92, 46.91, 16.65]},
    # not in Table IV: CLDL(3,0,0) of Table VI, the closest the paper comes to a baseline
    "CLDL(3,0,0), Table VI": {"BIM": [89.83, 60.81, 28.04, 9.8], "FGSM": [92.76, 76.59, 47.47, 26.68],
                              "MIM": [89.73, 61.41, 28.23, 9.39], "PGD": [88.99, 57.23, 23.88, 6.54]},
}
CLDL_TABLE_IV = {"table": "CLDL Table IV (MNIST, N = 3 LeNet-5)", "eps": [0.1, 0.15, 0.2, 0.25],
                 "metric": "transfer robust accuracy (%) among the target's clean-correct images, worst case "
                           "over 12 transfer sets (2 baseline surrogates x CE/CW x 3 seeds), 9,000 report images",
                 "columns": _T4}

# CLDL Table VIII (spec cldl §9, F-MNIST, N = 3 LeNet-5): [ε 0.08, 0.1, 0.15, 0.2] per attack family
_T8 = {
    "ADP": {"BIM": [38.38, 28.39, 10.55, 1.78], "FGSM": [48.25, 40.09, 23.24, 9.82],
            "MIM": [38.24, 28.41, 9.17, 1.01], "PGD": [37.74, 27.75, 8.69, 1.08]},
    "GAL": {"BIM": [54.43, 44.37, 22.63, 7.1], "FGSM": [62.77, 54.22, 36.09, 15.85],
            "MIM": [52.83, 42.44, 19.61, 3.44], "PGD": [52.34, 41.71, 18.78, 3.52]},
    "DVERGE": {"BIM": [39.42, 28.16, 10.58, 2.69], "FGSM": [52.39, 42.8, 25.41, 13.33],
               "MIM": [39.58, 28.19, 9.98, 2.33], "PGD": [39.17, 28.15, 9.67, 2.24]},
    "TRS": {"BIM": [54.71, 44.61, 25.06, 10.95], "FGSM": [62.83, 53.64, 37.63, 23.45],
            "MIM": [53.46, 43.1, 23.01, 7.84], "PGD": [52.86, 42.38, 22.44, 8.25]},
    "CLDL(3,2,4)": {"BIM": [54.19, 44.99, 27.84, 13.98], "FGSM": [61.99, 53.87, 38.49, 25.67],
                    "MIM": [52.88, 43.41, 25.2, 9.75], "PGD": [51.65, 42.23, 24.75, 10.91]},
}
CLDL_TABLE_VIII = {"table": "CLDL Table VIII (Fashion-MNIST, N = 3 LeNet-5)", "eps": [0.08, 0.1, 0.15, 0.2],
                   "headline_eps": 0.1,  # the claims at ε 0.1: at 0.2 most PGD cells are 1-11 %
                   "metric": CLDL_TABLE_IV["metric"], "columns": _T8}

CAMPAIGNS: dict[str, Campaign] = {c.name: c for c in [
    Campaign(
        "cldl-table4", "CLDL Table IV (MNIST): the comparison rows at the LSD code's budget", "lsd-mnist",
        rows=(Row("baseline", "baseline", "Baseline (3 x CE)"),
              Row("adp", "adp-lsd", "ADP (LSD)", "ADP"),
              Row("gal", "gal-lsd", "GAL (LSD)", "GAL"),
              Row("trs", "trs-lsd", "TRS (LSD)", "TRS"),
              Row("dverge", "dverge-lsd", "DVERGE (LSD)", "DVERGE"),
              Row("cldl-3-4-4", "cldl-3-4-4", "CLDL(3,4,4)", "CLDL(3,4,4)"),
              Row("cldl-3-2-1", "cldl-3-2-1", "CLDL(3,2,1)", "CLDL(3,2,1)")),
        seeds=(0, 1, 2),
        surrogates=(SurrogateDecl("surrogate-b3", "baseline", 100), SurrogateDecl("surrogate-b5", "baseline-5", 101),
                    SurrogateDecl("lsd-b3", "baseline", None, group="same-init"),
                    SurrogateDecl("lsd-b5", "baseline-5", None, group="same-init", data_seed_offset=1000)),
        paper=CLDL_TABLE_IV, whitebox_seeds=(0,),
        notes=("Budget: the full 60k MNIST training set, 20 + 1 passes (the LSD code's range(0, epochs + 1)), batch "
               "128 with the last partial batch kept (469 steps per pass), Adam lr 1e-3, eps 1e-7, weight decay "
               "1e-4, no decay, random horizontal flip (spec cldl §3, A12). Every row and every surrogate alike.",
               "Evaluation: every target by transfer (PROTOCOL's transfer set from both baseline surrogates, the "
               "same-init pair below and the same-method surrogate, on a seeded 2,000-image slice of the report "
               "subset); the white-box suite "
               "(PGD-50 × 5 restarts with CE, CW, DLR and the vote losses, FGSM, Square 1,000 queries, MORA, "
               "AutoAttack standard at ε 0.2, on a 500-image slice) on seed 0's targets only. Table IV is a transfer "
               "table, and the white-box suite, a check that a row's robustness is not an artefact of weak "
               "attacks, costs about as much as a target's transfer evaluation here (155 s for CLDL(3,4,4) seed 0 "
               "on a 100-image slice, one thread, `preliminary/whitebox-probe-cldl-3-4-4-s0-100.json`, so ≈ 13 "
               "min at 500; the same-method surrogate's examples ≈ 13 "
               "min, 3/8 of the 35 min the two baseline surrogates' 8 members took): seed 0 only saves ≈ 3 h "
               "of the evaluation phase on this CPU. `whitebox_seeds=None` runs it for every seed.",
               "Surrogates: PROTOCOL's pair (`surrogate-b3`, `surrogate-b5`, seeds 100 and 101, independent of every "
               "target) makes the headline table. The LSD code's own pair makes a second table (group `same-init`): "
               "its training scripts all call `torch.manual_seed(seed)` before building the members, and "
               "`eval/surrogate.py` loads the 3- and 5-member baselines of the targets' own seed, so its "
               "surrogates start from the targets' initial weights. Here: the baseline row's unit at the target's "
               "seed (`lsd-b3`, never used against itself; it also shares the targets' data order, as the LSD "
               "code's 3-member surrogate does with its ADP, GAL and TRS but not with CLDL) and a 5-member baseline "
               "at that seed (`lsd-b5`), whose first three members start where the targets' do, trained on another "
               "data order (`data_seed` = seed + 1000), as the LSD code's 5-member surrogate is. "
               "Measured before declaring it (`preliminary/README.md`, seed 0, one 3-member surrogate each, PGD ε "
               "0.2): such a surrogate lowered ADP, GAL, TRS and CLDL(3,2,1) by 6.4-10.5 points and CLDL(3,4,4) by "
               "2.9 against an independent one (6.3-12.1 and 5.4 against a second; the two independent ones differ "
               "by at most 2.5 on a row). A surrogate that shares the defender's initialisation is not a black-box "
               "attacker; the table "
               "measures how much of Table IV that setup explains.")),
    Campaign(
        "dkd-table3", "DKD Table III (MNIST): DKD against its comparators on the Table I network", "dkd-mnist",
        rows=(Row("dkd", "dkd-3voters", "DKD* (M + 3 auxiliaries, 3 voters)", "DKD*"),
              Row("kd", "kd-3voters", "KD* (sequential KD, 3 voters)", "KD*"),
              Row("ri", "ri-3", "RI* (3 independent members, boosted vote)", "RI*")),
        seeds=(0, 1, 2),
        surrogates=(SurrogateDecl("surrogate-lenet", "lenet-surrogate", 100, group="lenet"),
                    SurrogateDecl("surrogate-b3", "baseline", 101)),
        paper_group="lenet", paper_denominator="all",
        extra_transfer_attacks=({"name": "fgsm", "eps": [0.04, 0.08], "losses": ["ce"],
                                 "label": "fgsm (Table III)"},),
        overrides={"epochs": 10},
        paper={"table": "DKD Table III (MNIST, surrogate LeNet)", "eps": [0.04, 0.08, 0.1],
               "metric": "ensemble accuracy under transfer FGSM (all 10,000 test images, not conditional)",
               "columns": {"KD*": {"FGSM": [95.55, 92.49, 89.4], "clean": 96.14},
                           "DKD*": {"FGSM": [98.46, 96.29, 93.95], "clean": 98.84},
                           "RI*": {"FGSM": [96.44, 93.41, 90.71], "clean": 97.26}}},
        notes=("Budget: the paper's recipe (Adam 1e-4, batch 64, Table I network dkd_mnist) at 10 epochs per member "
               "instead of 100 (4 sequential members x 100 epochs does not fit the shared CPU); stated wherever a "
               "figure is quoted.",)),
    Campaign(
        "cldl-table8", "CLDL Table VIII (Fashion-MNIST): the comparison rows at the LSD code's budget",
        "lsd-fashion",
        rows=(Row("baseline", "baseline", "Baseline (3 x CE)"),
              Row("adp", "adp-lsd", "ADP (LSD)", "ADP"),
              Row("gal", "gal-lsd", "GAL (LSD)", "GAL"),
              Row("trs", "trs-lsd", "TRS (LSD)", "TRS"),
              Row("dverge", "dverge-lsd", "DVERGE (LSD)", "DVERGE"),
              Row("cldl-3-2-4", "cldl-3-2-4", "CLDL(3,2,4)", "CLDL(3,2,4)")),
        seeds=(0, 1, 2),
        surrogates=(SurrogateDecl("surrogate-b3", "baseline", 100), SurrogateDecl("surrogate-b5", "baseline-5", 101),
                    SurrogateDecl("lsd-b3", "baseline", None, group="same-init"),
                    SurrogateDecl("lsd-b5", "baseline-5", None, group="same-init", data_seed_offset=1000)),
        paper=CLDL_TABLE_VIII, whitebox_seeds=(0,),
        notes=("Budget: the full 60k Fashion-MNIST training set, 30 + 1 passes (the LSD code's range(0, epochs + "
               "1)), lr x0.1 after passes 10 and 20, batch 128 with the last partial batch kept, Adam lr 1e-3, eps "
               "1e-7, weight decay 1e-4, random horizontal flip (spec cldl §3, A11, A12). Every row and every "
               "surrogate alike.",
               "Campaign 3 of issue #21, after cldl-table4 and dkd-table3: declared so that it runs unchanged where "
               "there is time or a GPU (about 1.5 x cldl-table4's training: 31 passes instead of 21). Evaluation "
               "as cldl-table4's (PROTOCOL's F-MNIST transfer ε 0.08, 0.1, 0.15, 0.2; white-box on seed 0), "
               "surrogates likewise (PROTOCOL's independent pair for the headline, the LSD code's pair as group "
               "`same-init`). Table VIII has no baseline row; ours is trained as the reference and as the "
               "seed-matched 3-member surrogate.")),
]}


def get_campaign(name: str) -> Campaign:
    if name not in CAMPAIGNS:
        raise ValueError(f"unknown campaign {name!r}; expected one of {', '.join(sorted(CAMPAIGNS))}")
    return CAMPAIGNS[name]


# ------------------------------------------------------------------------------------------- helpers


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def pack_bits(values: Sequence[bool] | Any) -> str:
    """Booleans as base64 of their packed bits (8 per byte, first value in the high bit)."""
    vals = [bool(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    out = bytearray((len(vals) + 7) // 8)
    for i, v in enumerate(vals):
        if v:
            out[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(out)).decode()


def unpack_bits(text: str, n: int) -> list[bool]:
    raw = base64.b64decode(text)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw)} bytes cannot hold exactly {n} packed values")
    return [bool(raw[i // 8] & (0x80 >> (i % 8))) for i in range(n)]


def compress_json(obj: Any) -> str:
    return base64.b64encode(zlib.compress(json.dumps(obj, sort_keys=True).encode(), 9)).decode()


def decompress_json(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text)))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def git_commit(root: Path, paths: Sequence[Path], message: str, log: Callable[[str], None] = print,
               attempts: int = 60) -> bool:
    """Commit exactly ``paths`` (``git add`` + ``git commit --only``), retrying while the index is locked.

    Others' staged changes are left out of the commit (``--only``). Returns whether a commit was made.
    """
    rel = [str(Path(p).resolve().relative_to(root.resolve())) for p in paths]
    for i in range(attempts):
        add = _git(root, "add", "--", *rel)
        if add.returncode == 0:
            com = _git(root, "commit", "--only", "-m", message, "--", *rel)
            if com.returncode == 0:
                return True
            out = com.stdout + com.stderr
            if "nothing to commit" in out or "no changes added" in out:
                return False
            err = out
        else:
            err = add.stderr
        if "index.lock" not in err:
            log(f"git commit of {', '.join(rel)} failed: {err.strip()[:300]}")
            return False
        time.sleep(min(2 + i, 10))
    log(f"git commit of {', '.join(rel)} gave up: the index stayed locked")
    return False


# -------------------------------------------------------------------------------------------- units


def train_units(c: Campaign) -> list[TrainUnit]:
    """Every training unit of the campaign in run order: the first declared seed's rows and the surrogates,
    cheapest first; then every other seed's units, cheapest row first and its seeds in the declared order (a
    row's seeds, and so its evaluations, complete together; the total is the same as seed by seed)."""
    units_by_seed: dict[int, list[TrainUnit]] = {s: [] for s in c.seeds}
    overrides = {"eval_subset": c.eval_subset, **c.overrides}
    for s in c.seeds:
        for row in c.rows:
            units_by_seed[s].append(TrainUnit(f"{row.key}-s{s}", c.name, row.configuration, s, "target", row.key,
                                              train_spec(row.configuration, recipe_name=c.recipe, seed=s,
                                                         overrides=overrides)))
    sur = [TrainUnit(f"{d.key}-s{d.seed}", c.name, d.configuration, d.seed, "surrogate", d.key,
                     train_spec(d.configuration, recipe_name=c.recipe, seed=d.seed, overrides=overrides))
           for d in c.surrogates if d.seed is not None]
    for s in c.seeds:  # seed-matched surrogates: a unit per seed, unless a row's unit is the same training
        for d in c.surrogates:
            if d.seed is None and _seed_matched(c, d, s, units_by_seed[s]) is None:
                units_by_seed[s].append(TrainUnit(f"{d.key}-s{s}", c.name, d.configuration, s, "surrogate", d.key,
                                                  _matched_spec(c, d, s)))
    first, later = c.seeds[0], list(c.seeds[1:])
    ordered = sorted(units_by_seed[first] + sur, key=lambda u: (estimate_cost(u.spec), u.id))
    ordered += sorted((u for s in later for u in units_by_seed[s]),
                      key=lambda u: (estimate_cost(u.spec), u.row, later.index(u.seed)))
    ids = [u.id for u in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"campaign {c.name}: duplicate unit ids")
    return ordered


def _matched_spec(c: Campaign, d: SurrogateDecl, seed: int) -> dict[str, Any]:
    """The declared train spec of seed-matched surrogate ``d`` at ``seed`` (with its data seed, if offset)."""
    overrides: dict[str, Any] = {"eval_subset": c.eval_subset, **c.overrides}
    if d.data_seed_offset is not None:
        overrides["data_seed"] = seed + d.data_seed_offset
    return train_spec(d.configuration, recipe_name=c.recipe, seed=seed, overrides=overrides)


def _seed_matched(c: Campaign, d: SurrogateDecl, seed: int, units: list[TrainUnit]) -> TrainUnit | None:
    """The row unit at ``seed`` whose training spec is the seed-matched surrogate ``d``'s, if any."""
    want = digest(_matched_spec(c, d, seed))
    return next((u for u in units if u.role == "target" and u.seed == seed and u.digest == want), None)


def eval_units(c: Campaign) -> list[EvalUnit]:
    """One evaluation unit per target: surrogates = the declared ones (seed-matched ones at the target's seed,
    never the target itself), plus the same-method surrogate (the row's configuration at the next declared
    seed, never the target's own weights)."""
    all_units = train_units(c)
    by_id = {u.id: u for u in all_units}
    out = []
    for s_i, s in enumerate(c.seeds):
        for row in c.rows:
            target = by_id[f"{row.key}-s{s}"]
            surs: list[tuple[str, TrainUnit]] = []
            groups: dict[str, str] = {}
            for d in c.surrogates:
                seed = s if d.seed is None else d.seed
                unit = (_seed_matched(c, d, s, all_units) or by_id[f"{d.key}-s{s}"]) if d.seed is None \
                    else by_id[f"{d.key}-s{d.seed}"]
                if unit.id != target.id:
                    surs.append((d.label(seed), unit))
                    groups[d.label(seed)] = d.group
            if c.same_method_surrogate and len(c.seeds) > 1:
                other = c.seeds[(s_i + 1) % len(c.seeds)]
                surs.append((f"same-method {row.key} (seed {other})", by_id[f"{row.key}-s{other}"]))
                groups[surs[-1][0]] = "same-method"
            out.append(EvalUnit(target.id, target, tuple(surs), groups, c.paper_group, c.extra_transfer_attacks,
                                c.whitebox_seeds is None or s in c.whitebox_seeds))
    return out


def estimate_cost(spec: dict[str, Any]) -> float:
    """Relative compute of a training unit: Σ over stages of passes × steps × weighted ``step_cost``."""
    from ensemble_core.data import DATASET_INFO
    from ensemble_core.methods import get_method
    from ensemble_core.spec import TRAIN_SPLIT_SIZES, TrainSpec

    ts = TrainSpec.model_validate(spec)
    info = DATASET_INFO[ts.dataset]
    m = get_method(ts.method).from_spec_dict(ts.hyperparameters, members=ts.members, num_classes=info.num_classes,
                                             dataset=ts.dataset, architecture=ts.architecture)
    n = ts.train_subset or TRAIN_SPLIT_SIZES.get(ts.dataset, 50_000) - ts.val_size
    steps = math.ceil(n / ts.batch_size) if not ts.drop_last else n // ts.batch_size
    per_step = sum(sum(COST_WEIGHTS.get(k, 1.0) * v for k, v in m.step_cost(st).items()) for st in m.stages())
    return per_step * steps * ts.passes * ARCH_COST.get(ts.architecture, 1.0) * ts.batch_size / 128


# ------------------------------------------------------------------------------------------- paths


@dataclass
class Paths:
    root: Path
    results: Path  # docs/results/<campaign>
    runs: Path  # runs/campaign/<campaign>

    @classmethod
    def of(cls, c: Campaign, root: Path | None = None, results_dir: str | Path | None = None,
           runs_dir: str | Path | None = None) -> Paths:
        root = root or _project_root()
        results = Path(results_dir) if results_dir else root / "docs" / "results"
        runs = Path(runs_dir) if runs_dir else root / "runs" / "campaign"
        return cls(root, results / c.name, runs / c.name)

    def train_record(self, unit_id: str) -> Path:
        return self.results / "train" / f"{unit_id}.json"

    def checkpoint(self, unit_id: str) -> Path:
        return self.results / "checkpoints" / f"{unit_id}.pt"

    def eval_record(self, unit_id: str) -> Path:
        return self.results / "eval" / f"{unit_id}.json"

    def run_dir(self, unit_id: str) -> Path:
        return self.runs / unit_id

    def parked(self, unit_id: str, kind: str) -> Path:
        """Where ``--park`` keeps an unfinished unit's state in the repository: ``train.pt`` (the last epoch's
        checkpoint, optimizer included), ``train.json`` (what it is) or ``eval.json`` (per-example state)."""
        return self.results / "in-progress" / f"{unit_id}.{kind}"

    def rel(self, p: Path) -> str:
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)


def train_done(paths: Paths, unit: TrainUnit) -> bool:
    rec = paths.train_record(unit.id)
    if not rec.exists() or not paths.checkpoint(unit.id).exists():
        return False
    return json.loads(rec.read_text()).get("declared_digest") == unit.digest


# ----------------------------------------------------------------------- parked work in progress

PARK_FORMAT = "robust-ensembles/campaign-parked-v1"


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _tracked(paths: Paths, q: Path) -> bool:
    return _git(paths.root, "ls-files", "--error-unmatch", "--", paths.rel(q)).returncode == 0


def _eval_state_dirs(paths: Paths, unit_id: str) -> list[tuple[str, Path]]:
    """``(fingerprint, eval_state.json)`` of this unit's evaluation runs in ``runs/``, newest first."""
    pat = re.compile(rf"^{re.escape(unit_id)}-([0-9a-f]{{16}})$")
    found = [(m.group(1), d / "eval_state.json") for d in (paths.runs / "eval").glob(f"{unit_id}-*")
             if (m := pat.match(d.name)) and (d / "eval_state.json").exists()]
    return sorted(found, key=lambda t: t[1].stat().st_mtime, reverse=True)


def park(c: Campaign, paths: Paths, *, log: Callable[[str], None] = print) -> list[Path]:
    """Copy every unfinished unit's latest state from ``runs/`` into ``in-progress/`` (see the module docstring),
    and remove parked files that a recorded unit has superseded. Returns the paths written or removed."""
    from ensemble_core.checkpoint import load_checkpoint

    changed: list[Path] = []

    def drop(*ps: Path) -> None:
        for q in ps:
            if q.exists():
                q.unlink()
                if _tracked(paths, q):
                    changed.append(q)

    for u in train_units(c):
        pt, meta = paths.parked(u.id, "train.pt"), paths.parked(u.id, "train.json")
        if train_done(paths, u):
            drop(pt, meta)
            continue
        ckpt = paths.run_dir(u.id) / "checkpoint.pt"
        declared = paths.run_dir(u.id) / "declared_spec.json"
        if not ckpt.exists() or (declared.exists() and json.loads(declared.read_text()) != u.spec):
            continue  # nothing trained yet, or another declaration's weights (run_train_unit discards them)
        if meta.exists() and json.loads(meta.read_text()).get("sha256") == _sha256(ckpt):
            continue
        _copy_atomic(ckpt, pt)  # the trainer replaces checkpoint.pt atomically: the copy is one whole epoch's
        sha, prog = _sha256(pt), load_checkpoint(pt)["progress"]
        _atomic_write(meta, json.dumps({
            "format": PARK_FORMAT, "campaign": c.name, "unit": u.id, "kind": "train", "declared_digest": u.digest,
            "sha256": sha, "bytes": pt.stat().st_size, "progress": prog,
            "parked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1, sort_keys=True) + "\n")
        changed += [pt, meta]
        log(f"  parked {u.id}: stage {prog['stage'] + 1}/{prog['stages']}, {prog['epoch']}/{prog['epochs']} passes "
            f"done ({pt.stat().st_size / 1e6:.1f} MB)")
    for e in eval_units(c):
        parked = paths.parked(e.id, "eval.json")
        rec = paths.eval_record(e.id)
        recorded_fp = json.loads(rec.read_text()).get("fingerprint") if rec.exists() else None
        runs = [(fp, f) for fp, f in _eval_state_dirs(paths, e.id) if fp != recorded_fp]
        old = json.loads(parked.read_text()) if parked.exists() else None
        if not runs:
            if old is not None and old.get("fingerprint") == recorded_fp:
                drop(parked)
            continue
        fp, state_file = runs[0]
        state = json.loads(state_file.read_text())
        packed = compress_json(state)
        if old is not None and old.get("fingerprint") == fp and old.get("state_zlib_b64") == packed:
            continue
        _atomic_write(parked, json.dumps({
            "format": PARK_FORMAT, "campaign": c.name, "unit": e.id, "kind": "eval", "fingerprint": fp,
            "pieces_done": len(state.get("done", [])), "parked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "state_zlib_b64": packed}, indent=1, sort_keys=True) + "\n")
        changed.append(parked)
        log(f"  parked evaluation {e.id} ({fp}): {len(state.get('done', []))} pieces done")
    return changed


def unpark_train(unit: TrainUnit, paths: Paths, out: Path, log: Callable[[str], None] = print) -> bool:
    """Resume from the parked checkpoint when ``runs/`` has none and it was parked for this declaration."""
    pt, meta = paths.parked(unit.id, "train.pt"), paths.parked(unit.id, "train.json")
    if (out / "checkpoint.pt").exists() or not (pt.exists() and meta.exists()):
        return False
    info = json.loads(meta.read_text())
    if info.get("declared_digest") != unit.digest or info.get("sha256") != _sha256(pt):
        log(f"    {unit.id}: ignoring {paths.rel(pt)} (another declaration, or not the file that was parked)")
        return False
    _copy_atomic(pt, out / "checkpoint.pt")
    prog = info["progress"]
    log(f"    {unit.id}: resuming from the parked checkpoint ({prog['epoch']}/{prog['epochs']} passes of stage "
        f"{prog['stage'] + 1}, parked {info['parked_at']})")
    return True


def unpark_eval(unit_id: str, fingerprint: str, paths: Paths, out: Path, log: Callable[[str], None] = print) -> bool:
    """Restore the parked per-example state when ``runs/`` has none and it belongs to this evaluation."""
    parked, state_file = paths.parked(unit_id, "eval.json"), out / "eval_state.json"
    if state_file.exists() or not parked.exists():
        return False
    info = json.loads(parked.read_text())
    if info.get("fingerprint") != fingerprint:
        return False
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(state_file, json.dumps(decompress_json(info["state_zlib_b64"])))
    log(f"    {unit_id}: resuming from the parked evaluation state ({info['pieces_done']} pieces done)")
    return True


def drop_parked(paths: Paths, unit_id: str, kinds: Sequence[str]) -> list[Path]:
    """Remove the unit's parked files now that it is recorded; returns those git tracks (for the unit's commit,
    which records their removal)."""
    gone = []
    for kind in kinds:
        q = paths.parked(unit_id, kind)
        if q.exists():
            q.unlink()
            if _tracked(paths, q):
                gone.append(q)
    return gone


# ---------------------------------------------------------------------------------------- training


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _git_head(root: Path) -> dict[str, Any]:
    head = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "ensemble_core")
    return {"commit": head.stdout.strip() or None, "ensemble_core_dirty": bool(dirty.stdout.strip())}


def _round(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def clean_outcomes(checkpoint: Path, dataset: str, data_dir: str | None = None, device: str = "cpu",
                   n: int | None = None) -> dict[str, Any]:
    """Per-example clean outcomes of a checkpoint on the PROTOCOL report subset (all 9,000 images unless ``n``):
    deployed-rule correctness, abstentions and each member's correctness, as packed bits."""
    import torch

    from ensemble_core.checkpoint import load_ensemble
    from ensemble_core.data import iterate_eval, load_dataset, test_subset

    ens = load_ensemble(checkpoint, device=device)
    test = test_subset(load_dataset(dataset, "test", data_dir), "report", n=n)
    correct, abstain, members = [], [], []
    with torch.no_grad():
        for x, y in iterate_eval(test, 500, device):
            z = ens.member_logits(x)
            pred = ens.rule.predict_labels(z)
            correct.append((pred == y).cpu())
            abstain.append((pred < 0).cpu())
            members.append((z.argmax(-1) == y).cpu())
    c, a, m = torch.cat(correct), torch.cat(abstain), torch.cat(members, 1)
    k = int(m.shape[0])
    return {"subset": "PROTOCOL report subset (test indices after the 1,000-image selection subset of the "
                      "random.seed(0) shuffle)" + (f", first {len(test)}" if n else ", all of it"),
            "n": len(test), "combine": ens.combine, "acc": float(c.float().mean()),
            "abstain_rate": float(a.float().mean()), "member_acc": [float(m[i].float().mean()) for i in range(k)],
            "correct_bits": pack_bits(c), "abstain_bits": pack_bits(a),
            "member_correct_bits": [pack_bits(m[i]) for i in range(k)]}


def _refresh_leaderboard(paths: Paths) -> list[Path]:
    """The leaderboard's headline rewritten from the campaigns' records, when the results folder above this
    campaign's holds the published leaderboard (``docs/results``); the files written, for the unit's commit."""
    from ensemble_core.leaderboard import refresh_headline

    return refresh_headline(paths.results.parent)


def run_train_unit(unit: TrainUnit, paths: Paths, *, device: str = "cpu", commit: bool = False,
                   log: Callable[[str], None] = print, campaign: Campaign | None = None) -> dict[str, Any]:
    """Train one unit (resuming from ``runs/``), then write its record and members-only checkpoint (and, given
    the ``campaign``, its regenerated page, committed with them)."""
    from ensemble_core.checkpoint import load_checkpoint, save_checkpoint
    from ensemble_core.spec import TrainSpec
    from ensemble_core.training import train_local

    resolved = TrainSpec.model_validate(unit.spec).resolved()
    out = paths.run_dir(unit.id)
    out.mkdir(parents=True, exist_ok=True)
    declared = out / "declared_spec.json"
    if declared.exists() and json.loads(declared.read_text()) != unit.spec:  # the declaration changed since
        for stale in ("checkpoint.pt", "ensemble.pt"):  # never resume another spec's weights
            (out / stale).unlink(missing_ok=True)
        log(f"    {unit.id}: its declaration changed since the partial run in {out}; starting again")
    declared.write_text(json.dumps(unit.spec, indent=1, sort_keys=True))
    unpark_train(unit, paths, out, log)
    started = time.time()
    result, final = train_local(resolved, out, resume=True, progress=False, device=device,
                                log=lambda m: log(f"    {unit.id}: {m}"))
    state = load_checkpoint(final)
    slim = {k: v for k, v in state.items() if k != "optimizer"}
    slim["optimizer"] = None  # the members and auxiliary modules are all evaluation needs
    ckpt = save_checkpoint(slim, paths.checkpoint(unit.id))
    clean = clean_outcomes(ckpt, resolved["dataset"], resolved.get("data_dir"), device)
    history = result.history
    keep = ("epoch", "stage", "stage_name", "global_epoch", "lr", "epoch_time_s", "epoch_cpu_s", "sel_clean_acc",
            "val_clean_acc", "member_collapse")
    hist = [{k: v for k, v in h.items() if k in keep or k.startswith(("train_", "sel_member_acc_"))} for h in history]
    train_time = sum(float(h.get("epoch_time_s", 0.0)) for h in history)
    cpu = [h.get("epoch_cpu_s") for h in history]
    train_cpu = round(sum(float(c) for c in cpu), 1) if cpu and all(c is not None for c in cpu) else None
    record = {
        "format": TRAIN_FORMAT, "campaign": unit.campaign, "unit": unit.id, "role": unit.role, "row": unit.row,
        "configuration": unit.configuration, "configuration_title": configuration(unit.configuration).title,
        "seed": unit.seed, "declared_spec": unit.spec, "declared_digest": unit.digest, "resolved_spec": resolved,
        "checkpoint": {"path": paths.rel(ckpt), "sha256": _sha256(ckpt), "bytes": ckpt.stat().st_size,
                       "content": "members and auxiliary modules, no optimizer state"},
        "train_time_s": round(train_time, 1), "train_cpu_s": train_cpu,
        "train_time_note": "train_time_s: sum of the epochs' wall time over every (resumed) run, including any time "
                           "the process was paused or waiting for a core; train_cpu_s: the same epochs' CPU time of "
                           "the training process (null where an epoch was trained before it was recorded); both "
                           "exclude per-epoch monitoring on the 1,000-image selection subset",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "last_run_wall_s": round(time.time() - started, 1),
        "machine": _machine(device), "code": _git_head(paths.root),
        "final_metrics": _round(result.metrics), "clean": clean, "history": _round(hist, 5),
        "method_results": _round(result.results.get("method_results", {})),
    }
    rec_path = paths.train_record(unit.id)
    _atomic_write(rec_path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    files = [rec_path, ckpt, *drop_parked(paths, unit.id, ("train.pt", "train.json"))]
    if campaign is not None:
        page = paths.results / "README.md"
        _atomic_write(page, render_report(campaign, paths) + "\n")
        files.append(page)
    files += _refresh_leaderboard(paths)
    if commit:
        git_commit(paths.root, files,
                   f"campaign {unit.campaign}: {unit.id} trained ({record['configuration']}, seed {unit.seed}, "
                   f"clean {100 * clean['acc']:.2f} %)", log)
    return record


# -------------------------------------------------------------------------------------- evaluation


def evaluation_code_digest(root: Path | None = None) -> str:
    """Hash of the evaluation code (:data:`EVAL_CODE`, in the source tree this module is loaded from): its change
    re-runs evaluation units."""
    if root is None:
        try:  # the evaluation's own fingerprint of its code, when the evaluation provides one
            from ensemble_core.evaluation.codeversion import evaluation_code_fingerprint  # type: ignore[import-not-found]

            return str(evaluation_code_fingerprint())[:16]
        except ImportError:
            pass
    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for entry in EVAL_CODE:
        p = root / entry
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def campaign_evaluation_spec(dataset: str, checkpoint: str, *, quick: bool = False,
                             transfer_examples: int | None = None, wb_examples: int | None = None
                             ) -> dict[str, Any]:
    """The evaluation spec of one campaign target: the lead's ``reproduce.evaluation_spec`` when it exists,
    else an adapter over the current ``reproduce.eval_spec`` (PROTOCOL transfer set on a seeded report slice,
    white-box PGD-50). The one place to swap when the new suite lands."""
    from ensemble_core import reproduce

    fn = getattr(reproduce, "evaluation_spec", None)
    if fn is not None:
        return fn(dataset=dataset, checkpoint=checkpoint, quick=quick, transfer_examples=transfer_examples,
                  wb_examples=wb_examples)
    args = argparse.Namespace(dataset=dataset, quick=quick, autoattack=False, wb_examples=wb_examples,
                              transfer_examples=transfer_examples)
    return reproduce.eval_spec(args, checkpoint)


def eval_fingerprint(unit: EvalUnit, paths: Paths, spec_template: dict[str, Any]) -> str:
    shas = {"target": _sha256(paths.checkpoint(unit.target.id))}
    for name, s in unit.surrogates:
        shas[name] = _sha256(paths.checkpoint(s.id))
    return digest({"code": evaluation_code_digest(), "spec": spec_template, "checkpoints": shas}, 16)


def surrogate_groups(unit: EvalUnit) -> dict[str, str]:
    """Each surrogate's group: as declared (``baseline`` by default: the papers' transfer sets), ``same-method``
    for the row's own configuration at another seed."""
    return {name: unit.groups.get(name, "same-method" if name.startswith("same-method") else "baseline")
            for name, _ in unit.surrogates}


def paper_mean(records: list[dict[str, Any]], group: str = "baseline") -> dict[str, dict[str, float]]:
    """Spec cldl correction 2: the paper text's metric, correct adversarial instances over all adversarial
    instances averaged over the transfer sets, here the mean over the (surrogate, loss) components of each
    transfer record (an image wrong when clean counts as wrong), next to the code's per-image worst case."""
    out: dict[str, dict[str, float]] = {}
    transfer = [r for r in records if r.get("threat") == "transfer" and r.get("components")]
    groups = {r.get("surrogate_group") for r in transfer}
    # the papers' transfer sets are the baseline surrogates'; a record without groups covers every surrogate
    wanted = group if group in groups else next(iter(groups), None)
    for r in transfer:
        if r.get("surrogate_group") != wanted:
            continue
        vals = [c["robust_acc"] for c in r["components"] if c.get("robust_acc") is not None]
        if vals:
            out.setdefault(str(r["attack"]), {})[str(r["eps"])] = sum(vals) / len(vals)
    return out


def run_eval_unit(unit: EvalUnit, paths: Paths, *, device: str = "cpu", commit: bool = False, quick: bool = False,
                  transfer_examples: int | None = None, wb_examples: int | None = None,
                  log: Callable[[str], None] = print, campaign: Campaign | None = None) -> dict[str, Any]:
    """Evaluate one target against its surrogates from the committed checkpoints; write the record (with
    ``campaign``, also its regenerated page), and the leaderboard's headline where it is published."""
    from ensemble_core.evaluation import run_evaluation

    dataset = unit.target.spec["dataset"]
    ckpt = paths.checkpoint(unit.target.id)
    spec = campaign_evaluation_spec(dataset, str(ckpt), quick=quick, transfer_examples=transfer_examples,
                                    wb_examples=wb_examples)
    if unit.extra_transfer_attacks:
        from ensemble_core.evaluation.runner import protocol_transfer_attacks

        base = spec.get("transfer_attacks") or [a.model_dump(mode="json") for a in protocol_transfer_attacks(dataset)]
        spec = {**spec, "transfer_attacks": [*base, *unit.extra_transfer_attacks]}
    if not unit.whitebox:
        spec = {**spec, "attacks": []}  # transfer only: the white-box suite runs on the whitebox_seeds' targets
    template = {k: v for k, v in spec.items() if k != "target_checkpoint"}
    fp = eval_fingerprint(unit, paths, template)
    rec_path = paths.eval_record(unit.id)
    if rec_path.exists() and json.loads(rec_path.read_text()).get("fingerprint") == fp:
        log(f"  {unit.id}: evaluation {fp} already recorded")
        return json.loads(rec_path.read_text())
    out = paths.runs / "eval" / f"{unit.id}-{fp}"
    unpark_eval(unit.id, fp, paths, out, log)
    surrogates = {name: str(paths.checkpoint(s.id)) for name, s in unit.surrogates}
    groups = surrogate_groups(unit)
    extra: dict[str, Any] = {}
    if "surrogate_groups" in inspect.signature(run_evaluation).parameters:
        extra["surrogate_groups"] = groups  # per-group worst cases: the paper's (baselines) and ours (all)
    state_file = out / "eval_state.json"
    resumed = len(json.loads(state_file.read_text()).get("done", [])) if state_file.exists() else 0
    t0 = time.time()
    result = run_evaluation(spec, ckpt, surrogates=surrogates, out_dir=out, cache_dir=paths.runs / "transfer-cache",
                            device=device, log=lambda m: log(f"    {unit.id}: {m}"), plots=False, **extra)
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    records = result.get("records", [])
    record = {
        "format": EVAL_FORMAT, "campaign": unit.target.campaign, "unit": unit.id, "fingerprint": fp,
        "evaluation_code_digest": evaluation_code_digest(), "evaluation_spec": template,
        "target": {"unit": unit.target.id, "checkpoint": paths.rel(ckpt)},
        "surrogates": {name: {"unit": s.id, "checkpoint": paths.rel(paths.checkpoint(s.id)),
                              "group": groups[name]} for name, s in unit.surrogates},
        "clean": result.get("clean"), "flags": result.get("flags"), "records": records,
        "paper_mean": paper_mean(records, unit.paper_group), "paper_group": unit.paper_group,
        "paper_mean_label": "mean over the transfer sets (surrogate x loss) of the accuracy on all images of the "
                            "slice (the paper text's definition, spec cldl correction 2)",
        "per_example_state_zlib_b64": compress_json(state) if state is not None else None,
        # wall_time_s is this process's; an evaluation resumed from runs/ or a parked state also ran before it
        # (resumed_pieces done then). attack_time_s: the pieces' own seconds, summed over every process.
        "wall_time_s": round(time.time() - t0, 1), "resumed_pieces": resumed,
        "attack_time_s": round(sum((state or {}).get("timings", {}).values()), 1),
        "machine": _machine(device), "code": _git_head(paths.root),
    }
    _atomic_write(rec_path, json.dumps(_round(record), indent=1, sort_keys=True, default=str) + "\n")
    files = [rec_path, *drop_parked(paths, unit.id, ("eval.json",))]
    if campaign is not None:
        page = paths.results / "README.md"
        _atomic_write(page, render_report(campaign, paths) + "\n")
        files.append(page)
    files += _refresh_leaderboard(paths)
    if commit:
        git_commit(paths.root, files, f"campaign {unit.target.campaign}: {unit.id} evaluated ({fp})", log)
    return record


# ------------------------------------------------------------------------------------------- runner


def robust_wall_s(rec: dict[str, Any]) -> float:
    """A unit's training wall time with pauses left out: per stage, the median epoch wall time × its epochs.

    A paused process (SIGSTOP during a quiet measurement) or a machine busy for a while inflates a few epochs'
    ``epoch_time_s``; their median is what an epoch takes on this machine as it usually is. The ETA clock reads
    this, not the recorded sum. Falls back to ``train_time_s`` for a record without a history."""
    by_stage: dict[Any, list[float]] = {}
    for h in rec.get("history") or []:
        if h.get("epoch_time_s") is not None:
            by_stage.setdefault(h.get("stage", 0), []).append(float(h["epoch_time_s"]))
    if not by_stage:
        return float(rec.get("train_time_s") or 0.0)
    return sum(statistics.median(v) * len(v) for v in by_stage.values())


def train_time_cell(rec: dict[str, Any]) -> str:
    """The report's training time of one record: the measured CPU time where recorded (``train_cpu_s``, CPU
    runs), else the pause-free estimate :func:`robust_wall_s` marked ``≈ … †``."""
    on_cpu = not str(rec.get("machine", {}).get("device", "cpu")).startswith("cuda")
    if on_cpu and rec.get("train_cpu_s"):
        return _fmt_s(float(rec["train_cpu_s"]))
    if not on_cpu:
        return _fmt_s(float(rec.get("train_time_s") or 0.0)) + " (wall)"
    return f"≈ {_fmt_s(robust_wall_s(rec))} †"


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


class CostClock:
    """Seconds per unit of estimated cost, from finished units' records (prior: the 2-core CPU)."""

    def __init__(self, prior: float = PRIOR_S_PER_COST) -> None:
        self.cost, self.seconds, self.prior = 0.0, 0.0, prior

    def add(self, cost: float, seconds: float) -> None:
        if cost > 0 and seconds > 0:
            self.cost += cost
            self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.seconds / self.cost if self.cost else self.prior


def calibrated_clock(paths: Paths, units: Sequence[TrainUnit], device: str = "cpu") -> CostClock:
    """The ETA clock calibrated on the recorded units trained on the same kind of device (CPU or CUDA); where some
    of them kept their CPU time (``train_cpu_s``: trained by the current code, with the faster channels-last
    layout), on those only: the older records' epochs ran 1.2-2.6 times slower per unit of cost."""
    clock, recent = CostClock(), CostClock()
    on_device = device.startswith("cuda")
    for u in units:
        if train_done(paths, u):
            rec = json.loads(paths.train_record(u.id).read_text())
            if str(rec.get("machine", {}).get("device", "cpu")).startswith("cuda") == on_device:
                clock.add(estimate_cost(u.spec), robust_wall_s(rec))
                if rec.get("train_cpu_s") is not None:
                    recent.add(estimate_cost(u.spec), robust_wall_s(rec))
    return recent if recent.cost else clock


def in_progress(paths: Paths, unit: TrainUnit) -> bool:
    """Whether a training unit not yet recorded has epochs done (in ``runs/`` or parked)."""
    return not train_done(paths, unit) and ((paths.run_dir(unit.id) / "checkpoint.pt").exists()
                                            or paths.parked(unit.id, "train.json").exists())


def training_queue(paths: Paths, units: list[TrainUnit]) -> list[TrainUnit]:
    """The units still to train, in ``units``' order except that those with work in progress go first."""
    todo = [u for u in units if not train_done(paths, u)]
    return sorted(todo, key=lambda u: not in_progress(paths, u))  # stable: otherwise the run order


def run_training(c: Campaign, paths: Paths, *, device: str = "cpu", commit: bool = False,
                 units: list[TrainUnit] | None = None, max_units: int | None = None,
                 log: Callable[[str], None] = print,
                 after_unit: Callable[[TrainUnit], None] | None = None) -> list[str]:
    """Train every unit not yet recorded, in order; one progress line per unit with an ETA; ``after_unit`` is
    called with each unit once it is recorded. Returns the ids trained in this call."""
    units = units if units is not None else train_units(c)
    costs = {u.id: estimate_cost(u.spec) for u in units}
    clock = calibrated_clock(paths, units, device)
    todo = training_queue(paths, units)
    log(f"[campaign {c.name}] {len(units) - len(todo)}/{len(units)} training units recorded, {len(todo)} to train; "
        f"estimated {_fmt_s(sum(costs[u.id] for u in todo) * clock.rate)} at {1000 * clock.rate * 3:.0f} ms per "
        f"3-member LeNet-5 baseline step")
    trained: list[str] = []
    for i, u in enumerate(todo):
        if max_units is not None and len(trained) >= max_units:
            break
        left = sum(costs[v.id] for v in todo[i:]) * clock.rate
        log(f"[campaign {c.name}] unit {i + 1}/{len(todo)} {u.id} ({u.configuration}, seed {u.seed}): start, est. "
            f"{_fmt_s(costs[u.id] * clock.rate)}; all remaining training {_fmt_s(left)} (evaluation not included), ETA "
            f"{time.strftime('%a %H:%M', time.localtime(time.time() + left))}")
        t0 = time.time()
        rec = run_train_unit(u, paths, device=device, commit=commit, log=log, campaign=c)
        clock.add(costs[u.id], robust_wall_s(rec) or time.time() - t0)
        trained.append(u.id)
        left = sum(costs[v.id] for v in todo[i + 1:]) * clock.rate
        log(f"[campaign {c.name}] unit {i + 1}/{len(todo)} {u.id}: done in {_fmt_s(time.time() - t0)}, clean "
            f"{100 * rec['clean']['acc']:.2f} % (members "
            f"{', '.join(f'{100 * a:.1f}' for a in rec['clean']['member_acc'])}); {len(todo) - i - 1} left, "
            f"ETA {time.strftime('%a %H:%M', time.localtime(time.time() + left))}")
        if after_unit is not None:
            after_unit(u)
    return trained


def run_evaluations(c: Campaign, paths: Paths, *, device: str = "cpu", commit: bool = False, quick: bool = False,
                    transfer_examples: int | None = None, wb_examples: int | None = None,
                    max_units: int | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Evaluate every target whose checkpoints (target and surrogates) are recorded; skip recorded ones."""
    done: list[str] = []
    units = eval_units(c)
    ready = [u for u in units if train_done(paths, u.target) and all(train_done(paths, s) for _, s in u.surrogates)]
    log(f"[campaign {c.name}] {len(ready)}/{len(units)} evaluation units have their checkpoints")
    times: list[float] = []
    for i, u in enumerate(ready):
        if max_units is not None and len(done) >= max_units:
            break
        eta = (statistics.mean(times) * (len(ready) - i)) if times else None
        log(f"[campaign {c.name}] evaluation {i + 1}/{len(ready)} {u.id}: start"
            + (f"; ETA {time.strftime('%a %H:%M', time.localtime(time.time() + eta))}" if eta else ""))
        t0 = time.time()
        rec_path = paths.eval_record(u.id)
        before = rec_path.stat().st_mtime_ns if rec_path.exists() else None
        run_eval_unit(u, paths, device=device, commit=commit, quick=quick, transfer_examples=transfer_examples,
                      wb_examples=wb_examples, log=log, campaign=c)
        if rec_path.stat().st_mtime_ns != before:  # evaluated now, not found recorded: it counts for the ETA
            times.append(time.time() - t0)
        done.append(u.id)
        log(f"[campaign {c.name}] evaluation {i + 1}/{len(ready)} {u.id}: done in {_fmt_s(time.time() - t0)}")
    return done


# ------------------------------------------------------------------------------------------- report


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f} (n 1)"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f} (n {len(vals)})"


def stale_evaluations(evals: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The recorded evaluations made with other evaluation code than this tree's (unit → their code digest): the
    campaign re-runs them, and until then their cells are the earlier code's."""
    current = evaluation_code_digest()
    return {u: str(rec.get("evaluation_code_digest")) for u, rec in evals.items()
            if rec.get("evaluation_code_digest") != current}


def _stale_evaluations(evals: dict[str, dict[str, Any]]) -> list[str]:
    stale = stale_evaluations(evals)
    if not stale:
        return []
    return [f"**Evaluated with earlier evaluation code** ({len(stale)} of {len(evals)} records; this tree's is "
            f"`{evaluation_code_digest()}`): "
            + ", ".join(f"`{u}` (`{d}`)" for u, d in sorted(stale.items()))
            + ". The campaign re-runs these units; until then their cells below are that code's. What changed is "
            "in the git log of `ensemble_core/evaluation/`.", ""]


def render_report(c: Campaign, paths: Paths) -> str:
    """The campaign's page from its records: training status and clean accuracy per row (mean ± sd over seeds);
    per evaluated cell ours (all images and clean-correct) beside the paper's figure."""
    units = train_units(c)
    lines = [f"# Campaign `{c.name}`: {c.title}", "",
             f"Generated by `python -m ensemble_core.campaign {c.name} --report` from the records in this folder; "
             "every figure below is in the record it names.", ""]
    lines += [f"- {n}" for n in c.notes]
    r = recipe(c.recipe)
    lines += [f"- Recipe `{r.name}`: {r.title} ({r.source}).",
              f"- Training seeds {', '.join(map(str, c.seeds))}; surrogates "
              + ", ".join(f"`{d.key}` ({configuration(d.configuration).title}, {d.seed_text}; group `{d.group}`)"
                          for d in c.surrogates)
              + (", and the same-method surrogate (the row's configuration at the next seed)"
                 if c.same_method_surrogate else "") + ".", "",
              "## Training", "",
              "Clean accuracy of the deployed rule on the whole 9,000-image report subset (`clean.acc` of each "
              "`train/<unit>.json`), mean ± sd over the recorded seeds.", "",
              "| row | configuration | seeds recorded | clean accuracy % | members' clean accuracy % (per seed) | "
              "training time per seed |", "|---|---|---|---|---|---|"]
    for row in c.rows:
        recs = [json.loads(paths.train_record(u.id).read_text()) for u in units
                if u.row == row.key and train_done(paths, u)]
        accs = [rec["clean"]["acc"] for rec in recs]
        members = "; ".join("/".join(f"{100 * a:.1f}" for a in rec["clean"]["member_acc"]) for rec in recs) or "–"
        tt = ", ".join(train_time_cell(rec) for rec in recs) or "–"
        lines.append(f"| {row.label} | `{row.configuration}` | {', '.join(str(rec['seed']) for rec in recs) or '–'} "
                     f"| {_mean_sd(accs)} | {members} | {tt} |")
    lines += ["", "## Black-box transfer", ""]
    if (paths.results / "preliminary" / "README.md").exists():
        lines += ["Before the evaluation units: `preliminary/README.md` scores the seed-0 targets by transfer from "
                  "the two baseline surrogates only (not campaign records; what it measured is stated there).", ""]
    evals = {u.id: json.loads(paths.eval_record(u.id).read_text()) for u in eval_units(c)
             if paths.eval_record(u.id).exists()}
    paper = c.paper or {}
    n_done = sum(train_done(paths, u) for u in units)
    lines[lines.index("## Black-box transfer") - 1:lines.index("## Black-box transfer") - 1] = [
        "", f"{n_done} of {len(units)} training units recorded; checkpoints "
        f"{sum(paths.checkpoint(u.id).stat().st_size for u in units if train_done(paths, u)) / 1e6:.1f} MB in "
        "`checkpoints/` (members and auxiliary modules only). Training times are on a shared 2-core CPU, one "
        "thread, niced, next to other jobs: indicative only. A time is the training process's CPU time over "
        "the epochs (`train_cpu_s`); † marks a record with epochs trained before CPU time was kept (code before "
        "7adaa7b): the median epoch's wall time × epochs, per stage, which leaves out the epochs the process "
        "spent paused (SIGSTOP during quiet measurements of the test suite) but not a slower machine; the "
        "record's `train_time_s` is the plain wall sum, pauses included. Those epochs also ran with the default "
        "convolution weight layout, 1.2–1.5× slower per LeNet-5 pass on this CPU than the channels-last layout "
        "used since (`python -m bench conv_layout`), so † times do not compare with the others."]
    todo = [u for u in units if not train_done(paths, u)]
    if todo and n_done:
        left_s = sum(estimate_cost(u.spec) for u in todo) * calibrated_clock(paths, units).rate
        at = lines.index("## Black-box transfer") - 1
        n = len(todo)
        lines[at:at] = ["", f"{n} training unit{'s' * (n != 1)} remain{'s' * (n == 1)}: about {_fmt_s(left_s)} of "
                        "one CPU core at the recorded units' pace (their epochs' median wall time per unit of declared "
                        "cost, from the records that kept their CPU time where there are any: older ones ran with a "
                        "slower layout; `--status` lists the costs), evaluation not included."]
    if not evals:
        lines += ["No evaluation unit is recorded yet (`--phase eval`). The paper's figures the cells will be set "
                  f"against ({paper.get('table', '–')}; {paper.get('metric', '')}):", ""]
        eps = paper.get("eps", [])
        cols = paper.get("columns", {})
        if cols:
            fams = sorted({f for col in cols.values() for f in col if isinstance(col[f], list)})
            lines += ["| column | " + " | ".join(f"{f} ε={e:g}" for f in fams for e in eps) + " |",
                      "|---|" + "---|" * (len(fams) * len(eps))]
            for name, col in cols.items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{col[f][i]:.2f}" if isinstance(col.get(f), list) else "–" for f in fams
                    for i in range(len(eps))) + " |")
            lines.append("")
        return "\n".join(lines)
    lines += [f"Paper: {paper.get('table', '–')}; {paper.get('metric', '')}.", ""]
    lines += _stale_evaluations(evals)
    lines += _transfer_table(c, evals, c.paper_group)
    lines += _claims_section(c, evals)
    for group in _extra_groups(c):
        lines += [f"## Black-box transfer from the `{group}` surrogates", "",
                  "The same cells with the worst case over this group of surrogates instead ("
                  + "; ".join(f"`{d.key}`: {configuration(d.configuration).title}, {d.seed_text}"
                              for d in c.surrogates if d.group == group)
                  + "). A seed-matched surrogate is never used against itself: a row whose unit is one of them "
                  "is scored against the group's other surrogates only.", ""]
        lines += _transfer_table(c, evals, group)
        lines += _claims_section(c, evals, group)
    lines += _whitebox_section(c, evals)
    return "\n".join(lines)


def _extra_groups(c: Campaign) -> list[str]:
    """Declared surrogate groups besides the paper's, in declaration order (each gets its own table)."""
    return list(dict.fromkeys(d.group for d in c.surrogates if d.group != c.paper_group))


def _transfer_table(c: Campaign, evals: dict[str, dict[str, Any]], group: str) -> list[str]:
    """Per row, attack and ε: ours (mean ± sd over seeds) from ``group``'s surrogates beside the paper's figure."""
    paper = c.paper or {}
    which = "the paper's transfer sets" if group == c.paper_group else "not the protocol of our headline table"
    lines = [f"Ours: transfer worst case per image over the `{group}` surrogates (both losses, every PGD "
             f"seed), {which}; mean ± sd over the evaluated seeds; *all images* / *among "
              "clean-correct* (the paper's denominator); *paper within 2 sd of ours*: whether the paper's figure lies "
              "within two standard deviations (over our seeds) of our mean, – with one seed. The same-method "
              "surrogate's records are in each `eval/<unit>.json`; the white-box worst case is below.", "",
              f"| row | attack | ε | ours, all images | ours, clean-correct | paper | ours − paper "
              f"({'clean-correct' if c.paper_denominator == 'clean_correct' else 'all images'}) | "
              "paper within 2 sd of ours | paper_mean (ours) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in c.rows:
        recs = [evals[u.id] for u in eval_units(c) if u.target.row == row.key and u.id in evals]
        if not recs:
            continue
        cells: dict[tuple[str, float], dict[str, list[float]]] = {}
        for rec in recs:
            for r in rec["records"]:
                if r.get("threat") != "transfer" or r.get("model") != "target":
                    continue
                if r.get("surrogate_group", c.paper_group) != group or str(r["attack"]).startswith("worst"):
                    continue  # this group's transfer sets (the paper's: the campaign's paper group)
                key = (str(r["attack"]), float(r["eps"]))
                d = cells.setdefault(key, {"all": [], "cc": [], "pm": []})
                if r.get("robust_acc") is not None:
                    d["all"].append(r["robust_acc"])
                if r.get("robust_acc_among_correct") is not None:
                    d["cc"].append(r["robust_acc_among_correct"])
                pm = (rec.get("paper_mean", {}) if group == rec.get("paper_group", c.paper_group)
                      else paper_mean(rec["records"], group)).get(str(r["attack"]), {}).get(str(r["eps"]))
                if pm is not None:
                    d["pm"].append(pm)
        for (attack, eps), d in sorted(cells.items()):
            fam = attack.split("-")[0].split(" ")[0].upper()
            col = (paper.get("columns", {}).get(row.paper_column or "", {}) or {}).get(fam)
            p = None
            if col and eps in paper.get("eps", []):
                p = col[paper["eps"].index(eps)]
            ours = d["cc"] if c.paper_denominator == "clean_correct" else d["all"]
            diff = f"{100 * statistics.mean(ours) - p:+.1f}" if (p is not None and ours) else "–"
            within = "–"
            if p is not None and len(ours) > 1:
                within = "yes" if abs(100 * statistics.mean(ours) - p) <= 2 * 100 * statistics.stdev(ours) else "no"
            lines.append(f"| {row.label} | {attack} | {eps:g} | {_mean_sd(d['all'])} | {_mean_sd(d['cc'])} | "
                         f"{'–' if p is None else f'{p:.2f}'} | {diff} | {within} | {_mean_sd(d['pm'])} |")
    lines.append("")
    return lines


def claim_verdict(diffs: list[float]) -> str:
    """Whether "A above B" holds, from the per-seed differences A − B (same training seed, paired).

    ``held``: the mean difference is positive and more than two standard errors (sd / √n) from 0; ``not held``:
    negative by more than two standard errors; otherwise ``not resolved with n seeds`` (always with one
    seed, whose spread is unknown)."""
    n = len(diffs)
    if n < 2:
        return f"not resolved with {n} seed{'s' if n != 1 else ''}"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(n)
    if mean > 2 * se:
        return "held"
    if mean < -2 * se:
        return "not held"
    return f"not resolved with {n} seeds"


def _claims_section(c: Campaign, evals: dict[str, dict[str, Any]], group: str | None = None) -> list[str]:
    """One sentence per claim of the paper's table at its headline ε: each row above the next in the paper's
    order, per attack family, from the per-seed paired differences of our cells (the paper's denominator), with
    the transfer sets of surrogate ``group`` (default: the paper's)."""
    group = group or c.paper_group
    paper = c.paper or {}
    eps_list = paper.get("eps", [])
    eps0 = paper.get("headline_eps", 0.2)
    if eps0 not in eps_list or not evals:
        return []
    key = "robust_acc_among_correct" if c.paper_denominator == "clean_correct" else "robust_acc"
    ours: dict[tuple[str, str], dict[int, float]] = {}  # (row label, family) -> seed -> value
    for u in eval_units(c):
        rec = evals.get(u.id)
        for r in (rec or {}).get("records", []):
            if r.get("threat") == "transfer" and r.get("model") == "target" and float(r["eps"]) == eps0 and \
                    r.get("surrogate_group", c.paper_group) == group and \
                    not str(r["attack"]).startswith("worst") and r.get(key) is not None:
                fam = str(r["attack"]).split("-")[0].split(" ")[0].upper()
                row = next(x for x in c.rows if x.key == u.target.row)
                ours.setdefault((row.label, fam), {})[u.target.seed] = 100 * r[key]
    title = f"## The paper's claims at ε {eps0:g}" + ("" if group == c.paper_group else f", `{group}` surrogates")
    out = [title, "",
           "Each row above the next one in the paper's order, per attack family: the paper's gap, ours as mean ± sd "
           "of the per-seed differences (the same training seed on both sides), and the verdict: *held* when our "
           "mean gap is positive by more than two standard errors, *not held* when negative by more than two, "
           "otherwise *not resolved* at that number of seeds.", "",
           "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    i0 = eps_list.index(eps0)
    for fam in sorted({f for col in paper.get("columns", {}).values() for f in col if isinstance(col[f], list)}):
        ranked = sorted(((col[fam][i0], row.label) for row in c.rows
                         if (col := paper["columns"].get(row.paper_column or "")) and fam in col
                         and (row.label, fam) in ours), reverse=True)
        for (pa, a), (pb, b) in zip(ranked, ranked[1:], strict=False):
            seeds = sorted(set(ours[(a, fam)]) & set(ours[(b, fam)]))
            diffs = [ours[(a, fam)][s] - ours[(b, fam)][s] for s in seeds]
            if not diffs:
                continue
            sd = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            out.append(f"| {a} above {b}, {fam} | {pa - pb:+.2f} | {statistics.mean(diffs):+.1f}{sd} (n "
                       f"{len(diffs)}) | {claim_verdict(diffs)} |")
    return [*out, ""] if len(out) > 6 else []  # a claim row below the header and its rule


def _whitebox_section(c: Campaign, evals: dict[str, dict[str, Any]]) -> list[str]:
    """Per row and ε: the target's per-image worst case over every white-box attack of its record (the
    ``worst case (Linf, all attacks)`` record), over the evaluated seeds that ran the white-box suite."""
    cells: dict[tuple[str, float], dict[str, list[Any]]] = {}
    for row in c.rows:
        for u in eval_units(c):
            rec = evals.get(u.id)
            if u.target.row != row.key or rec is None:
                continue
            for r in rec["records"]:
                if r.get("model") == "target" and r.get("threat") == "worst-case" and \
                        str(r.get("attack", "")).startswith("worst case (Linf"):
                    d = cells.setdefault((row.label, float(r["eps"])), {"all": [], "cc": [], "seeds": [], "flag": []})
                    d["all"].append(r["robust_acc"])
                    if r.get("robust_acc_among_correct") is not None:
                        d["cc"].append(r["robust_acc_among_correct"])
                    d["seeds"].append(u.target.seed)
                    d["flag"].append(bool(r.get("unreliable")))
    if not cells:
        return []
    seeds = "all seeds" if c.whitebox_seeds is None else "seed " + ", ".join(map(str, c.whitebox_seeds))
    out = ["## White-box", "",
           f"The targets' per-image worst case over every white-box attack of the record (L∞), {seeds}; *all "
           "images* / *among clean-correct*; ⚠ = flagged unreliable by the evaluation's checks (see the record's "
           "`flags`). The attacks, steps, restarts and slice are in each record's `evaluation_spec`.", "",
           "| row | ε | ours, all images | ours, clean-correct | seeds |", "|---|---|---|---|---|"]
    for (label, eps), d in cells.items():
        warn = " ⚠" if any(d["flag"]) else ""
        out.append(f"| {label} | {eps:g} | {_mean_sd(d['all'])}{warn} | {_mean_sd(d['cc'])} | "
                   f"{', '.join(map(str, d['seeds']))} |")
    return [*out, ""]


def _stats(vals: list[float]) -> dict[str, Any] | None:
    """Mean, sample sd (None with one value) and n of fractions, rounded; None without values."""
    if not vals:
        return None
    return {"mean": round(statistics.mean(vals), 6),
            "sd": round(statistics.stdev(vals), 6) if len(vals) > 1 else None, "n": len(vals)}


def headline(c: Campaign, paths: Paths) -> dict[str, Any]:
    """A campaign's summary for the leaderboard's headline (issue #21), from its records only.

    Per row: the training seeds recorded and evaluated; clean accuracy (the 9,000-image report subset); per ε
    the per-image transfer worst case over the paper group's surrogates (every transfer attack, loss and seed
    at that ε or below), over all images and among clean-correct; the white-box worst case (L∞) where the
    suite ran; and the paper's PGD figure. Each as mean, sd and n over seeds, as fractions (the paper's
    figures in %). Nothing here is computed beyond those records' figures and their mean and sd.
    ``stale_evaluations``: the recorded evaluations made with earlier evaluation code (their cells are that
    code's until the campaign re-runs them), as the campaign's page names them."""
    units = train_units(c)
    evs = eval_units(c)
    evals = {u.id: json.loads(paths.eval_record(u.id).read_text()) for u in evs if paths.eval_record(u.id).exists()}
    paper = c.paper or {}
    rows = []
    for row in c.rows:
        trained = [u for u in units if u.role == "target" and u.row == row.key and train_done(paths, u)]
        clean = [json.loads(paths.train_record(u.id).read_text())["clean"]["acc"] for u in trained]
        mine = [(u, evals[u.id]) for u in evs if u.target.row == row.key and u.id in evals]
        tr: dict[float, dict[str, list[float]]] = {}
        wb: dict[float, dict[str, list[float]]] = {}
        for _u, rec in mine:
            for r in rec["records"]:
                if r.get("model") != "target":
                    continue
                if r.get("threat") == "transfer" and str(r["attack"]).startswith("worst case (transfer, Linf") \
                        and r.get("surrogate_group") == c.paper_group:
                    d = tr.setdefault(float(r["eps"]), {"all": [], "cc": []})
                elif r.get("threat") == "worst-case" and str(r["attack"]).startswith("worst case (Linf"):
                    d = wb.setdefault(float(r["eps"]), {"all": [], "cc": []})
                else:
                    continue
                d["all"].append(r["robust_acc"])
                if r.get("robust_acc_among_correct") is not None:
                    d["cc"].append(r["robust_acc_among_correct"])
        col = (paper.get("columns", {}) or {}).get(row.paper_column or "", {}) or {}
        pgd = col.get("PGD") or col.get("FGSM")
        rows.append({
            "row": row.key, "label": row.label, "configuration": row.configuration,
            "seeds_trained": [u.seed for u in trained], "seeds_evaluated": [u.target.seed for u, _ in mine],
            "clean_acc": _stats(clean),
            "transfer_worst": [{"eps": e, "all": _stats(d["all"]), "clean_correct": _stats(d["cc"])}
                               for e, d in sorted(tr.items())],
            "white_box_worst": [{"eps": e, "all": _stats(d["all"]), "clean_correct": _stats(d["cc"])}
                                for e, d in sorted(wb.items())],
            "paper": ({"attack": "PGD" if col.get("PGD") else "FGSM", "eps": paper.get("eps"), "values": pgd}
                      if pgd else None)})
    pre = paths.results / "preliminary" / "README.md"
    specs = [rec.get("evaluation_spec", {}) for rec in evals.values()]
    wb_specs = [sp for sp in specs if sp.get("attacks")]
    evaluation = None if not specs else {
        "split": specs[0].get("split"), "seed": specs[0].get("seed"),
        "transfer_images": specs[0].get("transfer_n_examples") or specs[0].get("n_examples"),
        "white_box_images": wb_specs[0].get("n_examples") if wb_specs else None,
        "white_box_attacks": sorted({str(a.get("name")) for sp in wb_specs for a in sp["attacks"]})}
    return {"campaign": c.name, "evaluation": evaluation, "title": c.title, "page": f"{c.name}/README.md",
            "budget": c.notes[0] if c.notes else "",
            "preliminary_page": f"{c.name}/preliminary/README.md" if pre.exists() else None,
            "seeds": list(c.seeds), "paper_group": c.paper_group,
            "paper_group_surrogates": [d.key for d in c.surrogates if d.group == c.paper_group],
            "paper_denominator": c.paper_denominator, "paper_table": paper.get("table"),
            "train_units": {"recorded": sum(train_done(paths, u) for u in units), "declared": len(units)},
            "eval_units": {"recorded": len(evals), "declared": len(evs)},
            "stale_evaluations": sorted(stale_evaluations(evals)), "rows": rows}


def status_table(c: Campaign, paths: Paths) -> str:
    lines = [f"campaign {c.name}: {c.title}"]
    tu = train_units(c)
    for u in tu:
        meta = paths.parked(u.id, "train.json")
        state = "recorded" if train_done(paths, u) else (
            "partial (resumes from runs/)" if (paths.run_dir(u.id) / "checkpoint.pt").exists() else
            "parked at {epoch}/{epochs} passes (resumes from in-progress/)".format(
                **json.loads(meta.read_text())["progress"]) if meta.exists() else "to do")
        lines.append(f"  train {u.id:<22} {u.configuration:<16} est. cost {estimate_cost(u.spec) / 1e3:8.0f}k  {state}")
    for e in eval_units(c):
        parked = paths.parked(e.id, "eval.json")
        running = _eval_state_dirs(paths, e.id)
        state = "recorded" if paths.eval_record(e.id).exists() else (
            f"partial (resumes from runs/: {len(json.loads(running[0][1].read_text()).get('done', []))} pieces done)"
            if running else
            f"parked, {json.loads(parked.read_text())['pieces_done']} pieces done" if parked.exists() else "to do")
        rec = paths.eval_record(e.id)
        if rec.exists() and stale_evaluations({e.id: json.loads(rec.read_text())}):
            state += " with earlier evaluation code (re-runs)"
        if paths.eval_record(e.id).exists() and parked.exists():
            state += f", a newer evaluation parked ({json.loads(parked.read_text())['pieces_done']} pieces done)"
        lines.append(f"  eval  {e.id:<22} {state}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ensemble_core.campaign", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"a declared campaign: {', '.join(sorted(CAMPAIGNS))}")
    p.add_argument("--phase", choices=["train", "eval", "all"], default="all",
                   help="train: the training units only; eval: the evaluation units whose checkpoints are "
                        "recorded; all (default): training, with every evaluation unit run as soon as its target "
                        "and surrogates are recorded")
    p.add_argument("--status", action="store_true", help="list the units and what is recorded, then exit")
    p.add_argument("--report", action="store_true", help="write docs/results/<name>/README.md from the records")
    p.add_argument("--park", action="store_true",
                   help="copy every unfinished unit's latest state from runs/ into docs/results/<name>/in-progress/ "
                        "(committed with --commit) so that a fresh clone resumes it; run before a session ends")
    p.add_argument("--seeds", help="comma-separated training seeds to run (default: all declared)")
    p.add_argument("--units", help="comma-separated unit ids to run (default: all)")
    p.add_argument("--max-units", type=int, default=None, help="stop after this many units")
    p.add_argument("--commit", action="store_true", help="git-commit each finished unit's record and checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--nice", type=int, default=10, help="run at least this niceness (default 10)")
    p.add_argument("--quick", action="store_true", help="evaluation: the tiny smoke-test plan (numbers not meaningful)")
    p.add_argument("--transfer-examples", type=int, default=None, help="evaluation: transfer slice size")
    p.add_argument("--wb-examples", type=int, default=None, help="evaluation: white-box slice size")
    p.add_argument("--results-dir", help="records root (default docs/results)")
    p.add_argument("--runs-dir", help="work root (default runs/campaign)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.nice > 0 and hasattr(os, "nice"):
        current = os.nice(0)
        if current < args.nice:
            os.nice(args.nice - current)
    c = get_campaign(args.name)
    paths = Paths.of(c, results_dir=args.results_dir, runs_dir=args.runs_dir)
    if args.status:
        print(status_table(c, paths))
        return 0
    if args.report:
        out = paths.results / "README.md"
        _atomic_write(out, render_report(c, paths) + "\n")
        print(f"wrote {out}")
        return 0
    if args.park:
        changed = park(c, paths)
        if not changed:
            print("nothing to park: no unfinished unit has new state in runs/")
        elif args.commit:
            git_commit(paths.root, changed, f"campaign {c.name}: work in progress parked "
                                            f"({', '.join(sorted({q.name.split('.')[0] for q in changed}))})")
        return 0
    import torch

    torch.set_num_threads(max(1, args.threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    units = train_units(c)
    if args.seeds:
        seeds = {int(s) for s in args.seeds.split(",")}
        units = [u for u in units if u.seed in seeds or u.role == "surrogate"]
    if args.units:
        wanted = set(args.units.split(","))
        units = [u for u in units if u.id in wanted]
    log(f"[campaign {c.name}] device {device}, {torch.get_num_threads()} thread(s), niceness {os.nice(0)}")

    def evaluate(max_units: int | None = None) -> None:
        run_evaluations(c, paths, device=device, commit=args.commit, quick=args.quick,
                        transfer_examples=args.transfer_examples, wb_examples=args.wb_examples,
                        max_units=max_units, log=log)

    if args.phase == "train":
        run_training(c, paths, device=device, commit=args.commit, units=units, max_units=args.max_units, log=log)
    elif args.phase == "eval":
        evaluate(args.max_units)
    else:  # all: every evaluation unit as soon as its target and surrogates are recorded, between trainings
        evaluate()
        run_training(c, paths, device=device, commit=args.commit, units=units, max_units=args.max_units, log=log,
                     after_unit=lambda u: evaluate())
        evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
