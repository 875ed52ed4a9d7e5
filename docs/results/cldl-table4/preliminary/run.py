"""Preliminary transfer scores of cldl-table4's seed-0 targets from the two baseline surrogates only.

Not a campaign record: the campaign's evaluation units (``--phase eval``) also need the same-method surrogate
(the next seed), which is not trained yet. This uses the campaign's own evaluation spec (PROTOCOL's transfer
set on the seeded 2,000-image slice of the report subset) and its transfer cache, so the surrogates'
adversarial examples computed here are the ones the campaign's units will reuse.

    OMP_NUM_THREADS=1 nice -n 15 python docs/results/cldl-table4/preliminary/run.py baseline-s0,adp-s0,...

writes ``seed0-baseline-surrogates.json`` beside this file (one entry per target, merged with what is there);
``run.py --page`` writes ``README.md`` from it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ensemble_core.campaign import Paths, campaign_evaluation_spec, eval_units, get_campaign, paper_mean, train_done
from ensemble_core.evaluation import run_evaluation

OUT = Path(__file__).with_name("seed0-baseline-surrogates.json")


def main(targets: list[str]) -> None:
    torch.set_num_threads(1)
    c = get_campaign("cldl-table4")
    paths = Paths.of(c)
    done = json.loads(OUT.read_text()) if OUT.exists() else {}
    units = [(u.target.id, u, paths.checkpoint(u.target.id)) for u in eval_units(c)
             if u.target.id in targets and train_done(paths, u.target)]
    for name in targets:  # an ablation unit (ablation.py): scored as its campaign row's seed-0 unit is
        ckpt = OUT.with_name("ablation") / c.name / "checkpoints" / f"{name}.pt"
        if name.endswith("-data1000") and ckpt.exists():
            row_unit = name.removesuffix("-data1000")
            units.append((name, next(u for u in eval_units(c) if u.target.id == row_unit), ckpt))
    for name, u, ckpt in units:
        if name in done:
            continue
        spec = {**campaign_evaluation_spec("mnist", str(ckpt)), "attacks": []}  # transfer only
        surs = {n: str(paths.checkpoint(s.id)) for n, s in u.surrogates  # PROTOCOL's two baselines only
                if s.role == "surrogate" and u.groups[n] == c.paper_group}
        t0 = time.time()
        res = run_evaluation(spec, ckpt, surrogates=surs, out_dir=Path(tempfile.mkdtemp()),
                             cache_dir=paths.runs / "transfer-cache", device="cpu", plots=False,
                             surrogate_groups={n: u.groups[n] for n in surs}, log=lambda m: None)
        recs = [r for r in res["records"] if r["model"] == "target" and r["threat"] == "transfer"]
        keep = ("attack", "eps", "n_examples", "clean_acc", "robust_acc", "robust_acc_among_correct",
                "n_clean_correct", "n_robust", "flags", "unreliable", "attack_params")
        done[name] = {"surrogates": {n: u.groups[n] for n in surs}, "wall_s": round(time.time() - t0, 1),
                             "evaluation_spec": {k: v for k, v in spec.items() if k != "target_checkpoint"},
                             "paper_mean": paper_mean(res["records"], "all"),
                             "records": [{k: r.get(k) for k in keep} for r in recs]}
        OUT.write_text(json.dumps(done, indent=1, sort_keys=True, default=str) + "\n")
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)


def _cell(rec: dict[str, Any] | None) -> float | None:
    return None if rec is None or rec.get("robust_acc_among_correct") is None else 100 * rec["robust_acc_among_correct"]


def _se(rec: dict[str, Any]) -> float:
    """One binomial standard error of a cell among clean-correct images, in points."""
    p, n = rec["robust_acc_among_correct"], rec["n_clean_correct"]
    return 100 * (p * (1 - p) / n) ** 0.5


def page() -> str:
    """The preliminary page: per row, ours (seed 0, among clean-correct) beside Table IV's figure."""
    c = get_campaign("cldl-table4")
    data = json.loads(OUT.read_text())
    paper = c.paper
    fams = ("fgsm", "bim", "mim", "pgd")

    def rec(unit: str, fam: str, eps: float) -> dict[str, Any] | None:
        return next((r for r in data[unit]["records"] if str(r["attack"]).startswith(fam) and r["eps"] == eps), None)

    rows = [(row, f"{row.key}-s0") for row in c.rows if f"{row.key}-s0" in data]
    any_unit = rows[0][1]
    spec = data[any_unit]["evaluation_spec"]
    attacks = ", ".join(sorted({str(r["attack"]) for r in data[any_unit]["records"]
                                if not str(r["attack"]).startswith("worst")}))
    lines = ["# cldl-table4, preliminary: seed 0 by transfer from the two baseline surrogates", "",
             "**Not a campaign record, and not the campaign's result.** One training seed (0) per row; the transfer "
             "sets of the two baseline surrogates only (`surrogate-b3`, seed 100, 3 × LeNet-5; `surrogate-b5`, "
             "seed 101, 5 × LeNet-5; the paper's surrogate group); the same-method surrogate and seeds 1 and 2 come "
             "with the campaign's evaluation units. Written by `python docs/results/cldl-table4/preliminary/run.py "
             "--page` from `seed0-baseline-surrogates.json` (made by `run.py <targets>`, commands in its "
             "docstring).", "",
             "- Targets: the campaign's seed-0 checkpoints in `../checkpoints/`, trained at the full budget "
             "(60k MNIST, 21 passes, batch 128, Adam 1e-3; `../README.md`).",
             f"- Attacks: PROTOCOL's transfer set ({attacks}), crafted on the log of each surrogate's mean "
             "probabilities (PROTOCOL.md), "
             f"L∞, ε {', '.join(f'{e:g}' for e in paper['eps'])}; evaluation seed {spec['seed']}; a seeded "
             f"{spec['transfer_n_examples']:,}-image slice of the 9,000-image report subset (the paper: 9,000).",
             "- Ours: per image, the worst case over both surrogates, both losses (CE, CW κ 0.1) and, for PGD, 3 "
             "random starts; accuracy among the target's clean-correct images of the slice (Table IV's "
             "denominator). The paper's: worst case over 12 transfer sets (2 baseline surrogates × CE/CW × 3 "
             "seeds) of the same attacks (spec cldl §6.1: AdverTorch, 10 iterations, step ε/5, PGD from a uniform "
             "random start), on the LSD code's own training of each row.", "",
             "## ε = 0.2 (Table IV's headline column)", "",
             "| row | clean % (slice) | " + " | ".join(f"{f.upper()} ours / paper / diff" for f in fams) + " |",
             "|---|---|" + "---|" * len(fams)]
    for row, unit in rows:
        col = paper["columns"].get(row.paper_column or "", {})
        clean = rec(unit, "pgd", 0.2)
        cells = []
        for f in fams:
            ours = _cell(rec(unit, f, 0.2))
            p = col.get(f.upper(), [None] * 4)[paper["eps"].index(0.2)] if col else None
            cells.append(f"{ours:.1f} / {'–' if p is None else f'{p:.2f}'} / "
                         f"{'–' if p is None else f'{ours - p:+.1f}'}")
        lines.append(f"| {row.label} | {100 * clean['clean_acc']:.1f} | " + " | ".join(cells) + " |")
    head = " | ".join(f"ε {e:g} ours / paper" for e in paper["eps"])
    lines += ["", "## PGD at every ε", "", f"| row | {head} |", "|---|" + "---|" * len(paper["eps"])]
    for row, unit in rows:
        col = paper["columns"].get(row.paper_column or "", {}).get("PGD")
        cells = []
        for i, e in enumerate(paper["eps"]):
            ours = _cell(rec(unit, "pgd", e))
            cells.append(f"{ours:.1f} / {'–' if not col else f'{col[i]:.2f}'}")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    i2 = paper["eps"].index(0.2)
    ours = {r.label: _cell(rec(u, "pgd", 0.2)) for r, u in rows}
    theirs = {r.label: paper["columns"][r.paper_column]["PGD"][i2] for r, _ in rows if r.paper_column}
    ranked = sorted(((v, lab) for lab, v in ours.items()), reverse=True)
    p_ranked = sorted(((v, lab) for lab, v in theirs.items()), reverse=True)
    lines += ["", "## PGD at ε 0.2: order and gaps", "",
              "Ours (seed 0): " + " > ".join(f"{lab} {v:.2f}" for v, lab in ranked) + ".",
              "The paper's (rows we have trained): " + " > ".join(f"{lab} {v:.2f}" for v, lab in p_ranked) + ".", "",
              "| gap (paper's order) | paper | ours, seed 0 |", "|---|---|---|"]
    for (pa, a), (pb, b) in zip(p_ranked, p_ranked[1:], strict=False):
        lines.append(f"| {a} − {b} | {pa - pb:+.2f} | {ours[a] - ours[b]:+.2f} |")
    for a, b in (("CLDL(3,4,4)", "TRS (LSD)"),):  # the lead issue #21 quotes
        if a in theirs and b in theirs:
            lines.append(f"| {a} − {b} (the lead issue #21 quotes) | {theirs[a] - theirs[b]:+.2f} | "
                         f"{ours[a] - ours[b]:+.2f} |")
    worst = max((rec(u, "pgd", 0.2) for _, u in rows), key=lambda r: _se(r))
    spread = ""
    if ABLATION in data:
        moved = _cell(rec(ABLATION, "pgd", 0.2)) - _cell(rec("cldl-3-4-4-s0", "pgd", 0.2))  # type: ignore[operator]
        spread = (f" For CLDL(3,4,4) not even a gap of 15: a second training from the same initial weights on "
                  f"another data order scores {moved:+.2f} points at PGD ε 0.2 (the last section).")
    lines += ["", "One training seed cannot separate a gap of a few points from seed noise." + spread + " The "
              "campaign's three seeds (mean ± sd, `../README.md`) decide which of the paper's gaps hold. The slice's "
              "own sampling "
              f"error is smaller: at most ±{_se(worst):.1f} points (one binomial standard error, √(p(1−p)/n), of "
              f"the PGD ε 0.2 cells; n = {worst['n_clean_correct']:,} clean-correct images, p = "
              f"{_cell(worst):.1f} %).", ""]
    lines += _advertorch_section(rows)
    return "\n".join(lines)


def _lead(entry: dict[str, Any], a: str, b: str) -> float:
    """PGD ε 0.2 of unit a minus unit b in one advertorch-check entry (the paper's losses)."""
    return float(entry["cells"][a]["pgd"]["advertorch ce+cw-lsd"] - entry["cells"][b]["pgd"]["advertorch ce+cw-lsd"])


def _advertorch_section(rows: list[Any]) -> list[str]:
    """The cross-check against AdverTorch (``advertorch_check.py``, its ``advertorch-check.json``), if run."""
    path = OUT.with_name("advertorch-check.json")
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    main = data.get("0.2")
    if main is None:
        return []
    fams = ("fgsm", "bim", "mim", "pgd")
    lines = ["## Cross-check: the same transfer sets crafted with AdverTorch", "",
             "`advertorch_check.py` (its docstring has the commands; record `advertorch-check.json`) crafts the "
             "paper's transfer sets with AdverTorch 0.2.3, the library the LSD code calls (spec cldl §6.1), on the "
             f"same two surrogates and the same {main['n_images']:,} images at ε 0.2, and scores the same targets "
             "(per image, every copy correct, among clean-correct images). Three losses: CE; the CW margin "
             "(κ 0.1, ours); and the CW loss as the LSD code evaluates it (`eval/surrogate.py`), whose \"wrong "
             "class\" term is the maximum of the log-probabilities with the true entry *set to 0*, which is 0: its "
             "loss is −Σ relu(log p_y + κ), and it stops once the surrogate's p_y < e^−0.1 ≈ 0.905 (not a margin "
             f"attack). Wall time {main['wall_s'] / 60:.0f} min, one thread.", "",
             "| row | attack | ours (CE + CW) | AdverTorch CE + CW | AdverTorch CE + CW as LSD | AdverTorch CE | "
             "AdverTorch CW | AdverTorch CW as LSD |", "|---|---|---|---|---|---|---|---|"]
    gaps: dict[str, float] = {}
    for row, unit in rows:
        cell = main["cells"].get(unit)
        if cell is None:
            continue
        for f in fams:
            c = cell[f]
            lines.append(f"| {row.label} | {f.upper()} | {c['ours']:.2f} | {c['advertorch ce+cw']:.2f} | "
                         f"{c['advertorch ce+cw-lsd']:.2f} | {c['advertorch ce']:.2f} | {c['advertorch cw']:.2f} | "
                         f"{c['advertorch cw-lsd']:.2f} |")
            gaps[f"{unit} {f} lib"] = c["advertorch ce+cw"] - c["ours"]
            gaps[f"{unit} {f} lsd"] = c["advertorch ce+cw-lsd"] - c["advertorch ce+cw"]
    lib = [v for k, v in gaps.items() if k.endswith("lib")]
    lsd = [v for k, v in gaps.items() if k.endswith("lsd")]
    c = main["cells"]["cldl-3-4-4-s0"]["pgd"]
    lines += ["", f"AdverTorch minus ours (the same losses): {min(lib):+.2f} to {max(lib):+.2f} points over the "
              f"{len(lib)} cells; AdverTorch with the LSD form of the CW loss minus AdverTorch with ours: "
              f"{min(lsd):+.2f} to {max(lsd):+.2f} (the largest at FGSM, where the LSD form adds nothing to CE). "
              f"For CLDL(3,4,4) at PGD ε 0.2 the paper's whole evaluation (AdverTorch, the LSD CW form) gives "
              f"{c['advertorch ce+cw-lsd']:.2f} against our {c['ours']:.2f}, "
              f"{c['advertorch ce+cw-lsd'] - c['ours']:+.2f} "
              "points of the 14.0 by which we sit below the paper's 58.94. The gap is not in the attack library "
              "or the CW loss; it lies in the trained models, in the surrogates, or in what else differs.", ""]
    lines += _mim_section(rows, main)
    same, indep = data.get("0.2 baseline-s0"), data.get("0.2 surrogate-b3-s100")
    ctrl = data.get("0.2 surrogate-b5-s101[:3]")
    if same and indep and ctrl:
        lines += ["## Surrogates that share the targets' initial weights (the LSD code's setup)", "",
                  "Every LSD training script calls `torch.manual_seed(seed)` and then builds its members, and "
                  "`eval/surrogate.py` loads the baseline surrogates trained with the same `--seed` as the targets "
                  "(default 0): the 3-member surrogate starts from exactly the targets' initial weights, and the "
                  "5-member one's first three members too. PROTOCOL.md's surrogates are trained with other seeds. "
                  "Ours already share initialisation across methods at one seed (member k of seed s starts from "
                  "`torch.manual_seed(1000 s + k)`; our baseline-s0 and every seed-0 target start from the same "
                  "weights, and also see the same data order and flips, which the LSD code's ensembles share only "
                  "when their trainers draw nothing from the RNG before the first batch). So: one 3-member "
                  "surrogate at a time, two independent ones (`surrogate-b3` seed 100, and the first three members "
                  "of `surrogate-b5` seed 101, a 3-member baseline of its own since baseline members train alone) "
                  "and the same-initialisation one (`baseline-s0`); AdverTorch, ε 0.2, the paper's losses (CE and "
                  "the LSD CW form), per image all copies, among clean-correct:", "",
                  "| row | attack | independent A (`surrogate-b3`) | independent B (`surrogate-b5[:3]`) | same "
                  "initialisation (`baseline-s0`) | same − A | same − B |", "|---|---|---|---|---|---|---|"]

        def v(entry: dict[str, Any], unit: str, fam: str) -> float:
            return float(entry["cells"][unit][fam]["advertorch ce+cw-lsd"])

        units = [u for _, u in rows if u in same["cells"] and u in indep["cells"] and u in ctrl["cells"]]
        for row, unit in rows:
            if unit not in units:
                continue
            for f in fams:
                a, b, c = v(indep, unit, f), v(ctrl, unit, f), v(same, unit, f)
                lines.append(f"| {row.label} | {f.upper()} | {a:.2f} | {b:.2f} | {c:.2f} | {c - a:+.2f} | "
                             f"{c - b:+.2f} |")
        lab = {u: r.label for r, u in rows}
        ab = {u: abs(v(indep, u, "pgd") - v(ctrl, u, "pgd")) for u in units}
        d = {u: (v(same, u, "pgd") - v(indep, u, "pgd"), v(same, u, "pgd") - v(ctrl, u, "pgd")) for u in units}
        order = sorted(d, key=lambda u: d[u][0])
        worst = max(ab, key=ab.get)  # type: ignore[arg-type]
        least = {min(d, key=lambda u: -d[u][i]) for i in (0, 1)}  # the row that loses the least, per surrogate
        who = (f"{lab[least.pop()]} loses the least against either" if len(least) == 1
               else "The row that loses the least differs between A and B")
        lines += ["", f"At PGD the two independent surrogates differ by at most {ab[worst]:.2f} points on a row "
                  f"({lab[worst]}). Against A and B, the same-initialisation surrogate lowers " + ", ".join(
                      f"{lab[u]} by {-d[u][0]:.1f} and {-d[u][1]:.1f}" for u in order)
                  + f" points. {who}. CLDL(3,4,4)'s lead over TRS (LSD) goes from "
                  f"{_lead(indep, 'cldl-3-4-4-s0', 'trs-s0'):+.2f} (A) and "
                  f"{_lead(ctrl, 'cldl-3-4-4-s0', 'trs-s0'):+.2f} (B) to {_lead(same, 'cldl-3-4-4-s0', 'trs-s0'):+.2f}"
                  ", and over CLDL(3,2,1) from "
                  f"{_lead(indep, 'cldl-3-4-4-s0', 'cldl-3-2-1-s0'):+.2f} and "
                  f"{_lead(ctrl, 'cldl-3-4-4-s0', 'cldl-3-2-1-s0'):+.2f} to "
                  f"{_lead(same, 'cldl-3-4-4-s0', 'cldl-3-2-1-s0'):+.2f} (the paper, with both of its surrogates: "
                  "+19.75 and +12.03). Seed 0, one surrogate at a time. A surrogate that starts from the defender's "
                  "initial weights is not a black-box attacker: the campaign keeps PROTOCOL's independent "
                  "surrogates for its headline and declares the LSD code's pair (3- and 5-member baselines at the "
                  "target's own seed) as a second, labelled surrogate group (`same-init`).", "",
                  "Read from the LSD code: its ADP, GAL and TRS trainers draw nothing from the "
                  "torch RNG between building the members and the first batch, so they also share the 3-member "
                  "surrogate's data order and flips; CLDL builds its label confusion model first, so its order "
                  "differs. Here every row shares `baseline-s0`'s order. "
                  + ("The last section trains CLDL(3,4,4) from the seed-0 weights with another data order "
                     "(`data_seed`) and scores it against both pairs." if ablated(data) else
                     "The next run trains CLDL(3,4,4) from the seed-0 weights with another data order "
                     "(`data_seed`) and scores it against the same-init pair."),
                  ""]
    lines += _lsd_pair_section(rows, data)
    lines += _data_order_section(data)
    return lines


def _mim_section(rows: list[Any], main: dict[str, Any]) -> list[str]:
    """Why our MIM differed from AdverTorch's (``mim_probe.py``, its ``mim-probe.json``), if run."""
    path = OUT.with_name("mim-probe.json")
    if not path.exists():
        return []
    probe = json.loads(path.read_text())
    sets = {k: v for k, v in probe.items() if isinstance(v, dict) and "identical" in v}
    cell = probe["the CE+CW cell (worst case over both surrogates and both losses)"]
    units = [(row.label, unit) for row, unit in rows if unit in cell]

    def span(loss: str, variant: str) -> str:
        vals = [v["robust among clean-correct %"][u][variant] for k, v in sets.items() if k.endswith(loss)
                for u in v["robust among clean-correct %"]]
        return f"{min(vals):.1f}–{max(vals):.1f} %"

    def shares(loss: str, key: str, digits: int = 2) -> str:
        vals = sorted({round(100 * v["identical"][key], digits) for k, v in sets.items() if k.endswith(loss)})
        text = " and ".join(f"{x:g} %" for x in vals)
        return text + (" (both surrogates)" if len(vals) == 1 else " (one per surrogate)")

    def pct_span(vals: list[float]) -> str:
        return f"{100 * min(vals):.0f}–{100 * max(vals):.0f} %"

    def moved(loss: str, a: str, b: str) -> list[float]:
        return [v["robust among clean-correct %"][u][a] - v["robust among clean-correct %"][u][b]
                for k, v in sets.items() if k.endswith(loss) for u in v["robust among clean-correct %"]]

    zero_at_end = [v["share under AdverTorch's floor, per step"][-1] for k, v in sets.items() if k.endswith("cw")]
    first_ce = [v["share under AdverTorch's floor, per step"][0] for k, v in sets.items() if k.endswith("ce")]
    ce_fix = moved("ce", "ours", "unguarded")
    n_same = sum(all(abs(v["robust among clean-correct %"][u]["ours"] - v["robust among clean-correct %"][u]
                             ["unguarded"]) < 1e-9 for k, v in sets.items() if k.endswith("ce")) for _, u in units)
    ce_lib = moved("ce", "ours", "advertorch")
    before = {u: main["cells"][u]["mim"]["ours"] - main["cells"][u]["mim"]["advertorch ce+cw"] for _, u in units}
    after = {u: cell[u]["ours"] - cell[u]["advertorch"] for _, u in units}
    pgd = [main["cells"][u]["pgd"]["advertorch ce+cw"] - main["cells"][u]["pgd"]["ours"] for _, u in units]
    exact = all(main["cells"][u][f]["ours"] == main["cells"][u][f]["advertorch ce+cw"] for _, u in units
                for f in ("fgsm", "bim"))
    return [
        "### Why our MIM differed from AdverTorch's (2026-12-07)", "",
        "In the table above, MIM is the one attack family where our CE + CW cell sits above AdverTorch's on every "
        f"row: {min(before.values()):+.2f} to {max(before.values()):+.2f} points. "
        + ("FGSM and BIM match exactly. " if exact else "")
        + f"Our PGD, whose random starts are other draws, is {min(pgd):.2f} to {max(pgd):.2f} points below "
        "AdverTorch's, i.e. stronger. `mim_probe.py` (record `mim-probe.json`) crafts the same MIM sets "
        f"(ε {probe['eps']:g}, {probe['steps']} steps of ε/5, decay 1, the two baseline surrogates, CE and the CW "
        f"margin κ 0.1, the same {probe['n_images']:,} images) four ways:",
        "- `ours`: the engine with the guard described below;",
        "- `unguarded`: the engine as it was, which is torchattacks' division;",
        "- `advertorch`: AdverTorch itself;",
        "- `floor`: our loop with AdverTorch's normalisation.", "",
        "- **The CW copies stopped early.** A capped loss has an all-zero gradient once the surrogate's margin "
        f"passes κ. On AdverTorch's path, by step {probe['steps']}, {pct_span(zero_at_end)} "
        "of the images had a gradient with an L1 norm under 1e-6. That is, in practice, zero: the capped margin's "
        "gradient is either of order one or exactly zero. MIM divides the gradient by its mean absolute value. "
        "torchattacks' `MIFGSM`, which our engine followed, then computes 0/0: the momentum turns NaN, "
        "`sign(NaN)` is 0 in torch, and the example stops for good just past the surrogate's boundary. AdverTorch "
        "divides by `max(Σ|g|, 1e-6)`: a zero gradient adds nothing, and the example keeps moving along its "
        "momentum.",
        f"  - Robust among clean-correct, CW copies: {span('cw', 'unguarded')} unguarded against "
        f"{span('cw', 'advertorch')} with AdverTorch.",
        f"  - Our examples were AdverTorch's on {shares('cw', 'unguarded/advertorch', 0)} of images.",
        "- **The fix** (engine, `MIM_ZERO_DIV`): cleverhans' guard, dividing by `max(mean|g|, 1e-12)`.",
        f"  - Our CW copies are now AdverTorch's on {shares('cw', 'ours/advertorch')} of images.",
        f"  - The CE copies are unchanged on {n_same} of the {len(units)} targets on both surrogates, and moved by "
        f"at most {max(abs(x) for x in ce_fix):.2f} point otherwise.",
        "- **What remains: AdverTorch's floor of 1e-6.** The LSD code's cross-entropy is a batch mean, so on the "
        f"first step {pct_span(first_ce)} of the images have a gradient whose L1 norm is under "
        "1e-6. AdverTorch's floor shrinks those images' first contribution to the momentum. Ours normalises it "
        "to full weight.",
        f"  - The `floor` variant reproduces AdverTorch's examples on {shares('ce', 'floor/advertorch', 0)} "
        "of the images for CE.",
        f"  - Ours matches AdverTorch on {shares('ce', 'ours/advertorch', 0)} of the images for CE. Robust "
        f"fractions differ by {min(ce_lib):+.2f} to {max(ce_lib):+.2f} points per surrogate.",
        "  - In the CE + CW cell (worst case over both surrogates and both losses), ours minus AdverTorch went from "
        f"{min(before.values()):+.2f} to {max(before.values()):+.2f} points (unguarded) to "
        f"{min(after.values()):+.2f} to {max(after.values()):+.2f} ("
        + ", ".join(f"{label} {after[u]:+.2f}" for label, u in units) + ").",
        "  - We keep full-weight normalisation, the MI-FGSM paper's ∇/‖∇‖₁. The floor is an artefact of "
        "AdverTorch's divide-by-zero guard meeting a batch-mean loss.",
        "- **Effect on the campaign.** The guard changes the evaluation code, so the campaign re-runs the "
        "evaluations recorded before it. Until then, the campaign page names them. Only the MIM cells move: the "
        "white-box suite has no MIM.", ""]


def _lsd_pair_section(rows: list[Any], data: dict[str, Any]) -> list[str]:
    """Seed 0 under the LSD code's own pair of surrogates (``advertorch_check.py 0.2 lsd-b3=...,lsd-b5=...``)."""
    key = next((k for k in data if k.startswith("0.2 ") and "lsd-b5" in k), None)
    if key is None or "0.2" not in data:
        return []
    lsd, proto = data[key], data["0.2"]
    paper = get_campaign("cldl-table4").paper
    i2 = paper["eps"].index(0.2)
    fams = ("fgsm", "bim", "mim", "pgd")
    lines = ["## Seed 0 under the LSD code's own pair of surrogates", "",
             f"Surrogates {', '.join(f'`{n}` = `{u}`' for n, u in lsd['surrogates'].items())}: the 3-member "
             "baseline of the targets' seed (the same initial weights and data order as every target here) and a "
             "5-member baseline of that seed whose first three members share those initial weights, trained on "
             "another data order (`data_seed` 1000), as the LSD code's 5-member surrogate is. AdverTorch, the "
             "paper's losses (CE and the LSD CW form), both surrogates, the 12 copies per attack, ε 0.2, among "
             f"clean-correct, {lsd['n_images']:,} images. Beside it, the same evaluation from PROTOCOL's "
             "independent pair (`surrogate-b3`, `surrogate-b5`), and Table IV.", "",
             "| row | attack | PROTOCOL's pair | the LSD code's pair | paper | LSD pair − paper |",
             "|---|---|---|---|---|---|"]
    ours_lsd: dict[str, float] = {}
    for row, unit in rows:
        if unit not in lsd["cells"]:
            continue
        col = paper["columns"].get(row.paper_column or "", {})
        for f in fams:
            a = proto["cells"][unit][f]["advertorch ce+cw-lsd"]
            b = lsd["cells"][unit][f]["advertorch ce+cw-lsd"]
            p = col.get(f.upper(), [None] * 4)[i2] if col else None
            if f == "pgd" and p is not None:
                ours_lsd[row.label] = b
            lines.append(f"| {row.label} | {f.upper()} | {a:.2f} | {b:.2f} | {'–' if p is None else f'{p:.2f}'} | "
                         f"{'–' if p is None else f'{b - p:+.2f}'} |")
    theirs = {lab: paper["columns"][r.paper_column]["PGD"][i2] for r, _ in rows if (lab := r.label) in ours_lsd
              and r.paper_column}
    ranked = sorted(ours_lsd, key=ours_lsd.get, reverse=True)  # type: ignore[arg-type]
    p_ranked = sorted(theirs, key=theirs.get, reverse=True)  # type: ignore[arg-type]
    lines += ["", "PGD ε 0.2, the LSD code's pair: " + " > ".join(f"{lab} {ours_lsd[lab]:.2f}" for lab in ranked)
              + "; the paper: " + " > ".join(f"{lab} {theirs[lab]:.2f}" for lab in p_ranked) + ". Gaps in the "
              "paper's order, paper / ours with the LSD code's pair: " + "; ".join(
                  f"{a} − {b} {theirs[a] - theirs[b]:+.2f} / {ours_lsd[a] - ours_lsd[b]:+.2f}"
                  for a, b in zip(p_ranked, p_ranked[1:], strict=False)) + ".", ""]
    diffs: dict[str, list[float]] = {}
    for row, unit in rows:
        col = paper["columns"].get(row.paper_column or "", {})
        if unit in lsd["cells"] and col:
            diffs[row.label] = [lsd["cells"][unit][f]["advertorch ce+cw-lsd"] - col[f.upper()][i2] for f in fams]
    lines.append("Our cell minus the paper's, over the four attacks (FGSM, BIM, MIM, PGD): " + "; ".join(
        f"{lab} {min(d):+.2f} to {max(d):+.2f}" for lab, d in diffs.items()) + ".")
    cl = diffs.get("CLDL(3,4,4)")
    if cl is not None and cl[3] < -10:
        shortfall = paper["columns"]["CLDL(3,4,4)"]["PGD"][i2] - proto["cells"]["cldl-3-4-4-s0"]["pgd"][
            "advertorch ce+cw-lsd"]
        def move(unit: str) -> float:
            return float(lsd["cells"][unit]["pgd"]["advertorch ce+cw-lsd"]
                         - proto["cells"][unit]["pgd"]["advertorch ce+cw-lsd"])

        trs = max(abs(v) for v in diffs["TRS (LSD)"])
        lines += ["", f"So, with the LSD code's surrogates, TRS (LSD) lands within {trs:.2f} points of the paper at "
                  f"every attack; at PGD ε 0.2 ADP moves by {move('adp-s0'):+.2f} (to {diffs['ADP (LSD)'][3]:+.2f} "
                  f"from the paper) and GAL by {move('gal-s0'):+.2f} (still {diffs['GAL (LSD)'][3]:+.2f}). The CLDL "
                  f"rows' gap does not close: CLDL(3,4,4) is {-cl[3]:.2f} points below Table IV at PGD ε 0.2 with "
                  f"them, against {shortfall:.2f} with PROTOCOL's pair (the same evaluation). What remains is in "
                  "the CLDL rows' own training or in seed variation: "
                  + ("the next section trains CLDL(3,4,4) once more from the seed-0 weights on another data order "
                     "(the LSD code's CLDL does not share its surrogates' data order)." if ablated(data) else
                     "the next runs are CLDL(3,4,4) from the seed-0 weights on another data order (the LSD code's "
                     "CLDL does not share its surrogates' data order), and the campaign's seeds 1 and 2.")]
    lines += ["", "One training seed; the campaign's `same-init` group repeats this with three seeds and our own "
              "attacks.", ""]
    return lines


ABLATION = "cldl-3-4-4-s0-data1000"


def ablated(data: dict[str, Any]) -> bool:
    """Whether the data-order ablation is trained and scored (``_data_order_section`` has something to show)."""
    return any(k.endswith(f" → cldl-3-4-4-s0+{ABLATION}") for k in data)


def _data_order_section(data: dict[str, Any]) -> list[str]:
    """CLDL(3,4,4) from the seed-0 weights on another data order (``ablation.py``), beside the seed-0 row, under
    both pairs of surrogates (``advertorch_check.py 0.2 <pair> cldl-3-4-4-s0,cldl-3-4-4-s0-data1000``)."""
    runs = {k.split(" → ")[0]: v for k, v in data.items() if k.endswith(f" → cldl-3-4-4-s0+{ABLATION}")}
    train = OUT.with_name("ablation") / "cldl-table4" / "train" / f"{ABLATION}.json"
    if "0.2" not in runs or not train.exists():
        return []
    rec = json.loads(train.read_text())
    paper = get_campaign("cldl-table4").paper
    i2 = paper["eps"].index(0.2)
    pairs = [("0.2", "PROTOCOL's pair"), *[(k, "the LSD code's pair") for k in runs if "lsd-b5" in k]]
    lines = ["## CLDL(3,4,4) on another data order (the LSD code's CLDL and its surrogates)", "",
             f"`{ABLATION}` (`ablation.py`; record `ablation/cldl-table4/train/{ABLATION}.json`): CLDL(3,4,4) "
             "trained exactly as `cldl-3-4-4-s0`, from the same seed-0 initial weights, but with `data_seed` 1000, "
             "so its batches and flips differ from those of `baseline-s0` (the 3-member surrogate of the LSD "
             "code's pair) as the LSD code's CLDL's do. Clean accuracy on the 9,000-image report subset "
             f"{100 * rec['clean']['acc']:.2f} %. Both targets are scored in one run per pair, on the same "
             "AdverTorch transfer sets (the paper's losses, CE and the LSD CW form; ε 0.2; 12 copies per attack; "
             "per image all copies; among clean-correct; 2,000 images):", "",
             "| surrogates | attack | `cldl-3-4-4-s0` (the surrogate's data order) | `" + ABLATION + "` | "
             "difference | paper |", "|---|---|---|---|---|---|"]
    col = paper["columns"]["CLDL(3,4,4)"]
    for key, name in pairs:
        cells = runs[key]["cells"]
        for f in ("fgsm", "bim", "mim", "pgd"):
            a = cells["cldl-3-4-4-s0"][f]["advertorch ce+cw-lsd"]
            b = cells[ABLATION][f]["advertorch ce+cw-lsd"]
            lines.append(f"| {name} | {f.upper()} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {col[f.upper()][i2]:.2f} |")
    # the seed-0 row's cells against the earlier runs of the same transfer sets (advertorch_check is deterministic)
    earlier = {"0.2": data.get("0.2"), **{k: data.get(k) for k, _ in pairs if k != "0.2"}}
    drift = max(abs(runs[k]["cells"]["cldl-3-4-4-s0"][f]["advertorch ce+cw-lsd"]
                    - e["cells"]["cldl-3-4-4-s0"][f]["advertorch ce+cw-lsd"])
                for k, e in earlier.items() if e for f in ("fgsm", "bim", "mim", "pgd"))
    same = "exactly" if drift == 0 else f"to within {drift:.2f} points"

    def d(key: str, f: str) -> float:
        c = runs[key]["cells"]
        return float(c[ABLATION][f]["advertorch ce+cw-lsd"] - c["cldl-3-4-4-s0"][f]["advertorch ce+cw-lsd"])

    def v(key: str, unit: str) -> float:
        return float(runs[key]["cells"][unit]["pgd"]["advertorch ce+cw-lsd"])

    lsd = next((k for k, _ in pairs if k != "0.2"), None)
    ours = json.loads(OUT.read_text())

    def own(unit: str, attack: str) -> float:  # run.py's record: our attacks, PROTOCOL's pair, ε 0.2
        return 100 * next(r["robust_acc_among_correct"] for r in ours[unit]["records"]
                          if str(r["attack"]).startswith(attack) and r["eps"] == 0.2)

    p_pgd = col["PGD"][i2]
    iters = [d(k, f) for k, _ in pairs for f in ("bim", "mim")]
    lines += ["", f"The `cldl-3-4-4-s0` cells reproduce the earlier runs of the same transfer sets {same}. At PGD "
              f"ε 0.2 the other data order moves CLDL(3,4,4) by {d('0.2', 'pgd'):+.2f} points with PROTOCOL's pair"
              + (f" and {d(lsd, 'pgd'):+.2f} with the LSD code's pair" if lsd else "")
              + f"; BIM and MIM by {min(iters):+.2f} to {max(iters):+.2f}; FGSM by "
              + " and ".join(f"{d(k, 'fgsm'):+.2f} ({'PROTOCOL' if k == '0.2' else 'LSD'})" for k, _ in pairs)
              + ". The move is almost as large with PROTOCOL's independent pair, which shares neither initial weights "
              "nor data order with either training, as with the "
              "LSD code's pair (which would show alone a move due to the target's data order relative to its "
              "surrogate's, what this run was meant to isolate): it is a difference between two trainings of "
              "CLDL(3,4,4) that start from the same weights, i.e. training-run variation."]
    if ABLATION in ours:
        lines[-1] += (" Our own transfer evaluation (`run.py`: PROTOCOL's transfer set, CE and the CW margin, "
                      f"PROTOCOL's pair) agrees: PGD ε 0.2 {own('cldl-3-4-4-s0', 'pgd'):.2f} → "
                      f"{own(ABLATION, 'pgd'):.2f}, the "
                      f"worst case over every transfer attack {own('cldl-3-4-4-s0', 'worst'):.2f} → "
                      f"{own(ABLATION, 'worst'):.2f}.")
    if lsd:
        lo, hi = sorted((v(lsd, "cldl-3-4-4-s0"), v(lsd, ABLATION)))
        lo0, hi0 = sorted((v("0.2", "cldl-3-4-4-s0"), v("0.2", ABLATION)))
        between = lo <= p_pgd <= hi and lo0 <= p_pgd <= hi0
        lines += ["", f"With the LSD code's pair the other data order puts CLDL(3,4,4) at {v(lsd, ABLATION):.2f} "
                  f"against the paper's {p_pgd:.2f} ({v(lsd, ABLATION) - p_pgd:+.2f}); with PROTOCOL's pair at "
                  f"{v('0.2', ABLATION):.2f} ({v('0.2', ABLATION) - p_pgd:+.2f}). "
                  + ("The paper's figure lies between our two trainings under either pair "
                     f"({lo:.2f} and {hi:.2f} with the LSD code's pair, {lo0:.2f} and {hi0:.2f} with PROTOCOL's). "
                     if between else "")
                  + f"Two trainings are n = 2: their sample sd at PGD ε 0.2 is {abs(hi0 - lo0) / 2 ** 0.5:.1f} "
                  f"points with PROTOCOL's pair. The seed-0 row's shortfall there "
                  f"({p_pgd - v('0.2', 'cldl-3-4-4-s0'):.2f} points under this evaluation) is smaller than the "
                  f"{hi0 - lo0:.2f} by which these two trainings from the same weights differ, so one seed says "
                  "little about Table IV's CLDL cells. The campaign's three seeds measure that spread for every "
                  "row (mean ± sd); this pair shares its initial weights, so it is one draw of the data-order "
                  "part of it only."]
    probe = OUT.with_name("diversity-probe.json")
    if probe.exists():
        dp = json.loads(probe.read_text())
        u = dp["units"]

        def fools(unit: str) -> str:
            f = u[unit]["surrogate_fools"]
            return "/".join(f"{100 * f[k]:.0f}" for k in sorted(k for k in f if k != "ensemble")) + \
                f" % (ensemble {100 * f['ensemble']:.0f} %)"

        a, b = u["cldl-3-4-4-s0"], u[ABLATION]
        fa = sorted(v for k, v in a["surrogate_fools"].items() if k != "ensemble")
        fb = sorted(v for k, v in b["surrogate_fools"].items() if k != "ensemble")
        pattern = ("the more robust training has two members the surrogate's examples fool less often than any "
                   "of the other's, and one they fool more often than any of the other's. " if
                   fb[1] < fa[0] and fb[2] > fa[2] else "")
        base = u["baseline-s0"]
        lines += ["", f"Inside the two trainings (`diversity_probe.py`, record `diversity-probe.json`; the first "
                  f"{dp['n_images']:,} images of the slice; PGD-{dp['steps']} with CE, ε {dp['eps']:g}, step ε/5, "
                  "one random start): the members' input gradients are close to orthogonal in both (mean |cos| "
                  f"{a['grad_abs_cos_mean']:.4f} and {b['grad_abs_cos_mean']:.4f}; `baseline-s0` "
                  f"{base['grad_abs_cos_mean']:.2f}), and a PGD example crafted on one member fools another on "
                  f"{100 * a['member_transfer_mean']:.1f} and {100 * b['member_transfer_mean']:.1f} % of the images "
                  f"both classify correctly (`baseline-s0` {100 * base['member_transfer_mean']:.1f} %): by gradient "
                  "alignment (what ℓ_gd lowers) and by member-to-member transfer, the more robust training is not "
                  "the more diverse one. The same PGD crafted on `surrogate-b3` alone fools the members of "
                  f"`cldl-3-4-4-s0` on {fools('cldl-3-4-4-s0')} of their clean-correct images, those of `{ABLATION}` "
                  f"on {fools(ABLATION)}, and those of `trs-s0` on {fools('trs-s0')}: " + pattern
                  + "One pair of trainings; an observation, not a cause."]
    lines.append("")
    return lines


if __name__ == "__main__":
    if sys.argv[1:] == ["--page"]:
        OUT.with_name("README.md").write_text(page())
    else:
        main(sys.argv[1].split(","))
