"""``leaderboard``: every registered method through one pipeline, one budget and one attack protocol.

    python -m ensemble_core.leaderboard                       # or: robust-ensembles leaderboard
    python -m ensemble_core.leaderboard --datasets mnist --methods baseline,pdd
    python -m ensemble_core.leaderboard --render-only         # rebuild the tables from finished runs

For each data set (MNIST and Fashion-MNIST) and each registered method (the baseline, the five methods and the
comparison methods), it runs the PROTOCOL.md reproduction (``ensemble_core.reproduce``) with **the same budget
for every method**: ``lenet5``, 3 members, the method's default hyperparameters for the data set, Adam 1e-3,
weight decay 1e-4, batch 128, training seed 0, and the leaderboard's reduced CPU budget below. The baseline, the
transfer surrogates and their adversarial examples are trained and crafted once per data set and shared by every
method, so every method is scored on the very same images and adversarial copies.

It writes ``docs/results/leaderboard.md`` (one table per data set) and ``docs/results/leaderboard.json``, the
document the service serves at ``GET /v1/leaderboard``. A method whose run failed or has not run yet is listed as
such, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ensemble_core.reproduce import DATASETS, PROTOCOL_EPOCHS, _project_root

FORMAT = "robust-ensembles/leaderboard-v2"

# The one budget every method and the baseline get (PROTOCOL.md: "use one reduced budget for every method and the
# baseline alike, and say so next to the numbers"). Chosen so that all 11 methods on both data sets fit on the
# 2-core CPU machine in about two hours; the most expensive methods (TRS, CCE, ADV-EN, DVERGE) cost 12-16 times a
# baseline step.
BUDGET: dict[str, Any] = {"train_subset": 10_000, "epochs": 2, "members": 3, "transfer_examples": 1000,
                          "wb_examples": 200}

# Cheap methods first, so that a partial leaderboard is already useful; the baseline first of all (it trains the
# shared surrogates and crafts the transfer examples).
ORDER = ("baseline", "adp", "gal", "pdd", "parl", "cldl", "dkd", "adv_en", "cce", "dverge", "trs")

DS_NAME = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _log(msg: str) -> None:
    print(f"[leaderboard {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def members_for(method: str, budget: dict[str, Any]) -> int:
    """Networks to train so that the method's deployed rule listens to ``budget["members"]`` of them.

    Every method's deployed rule reads all its members except DKD's auxiliary vote, which leaves out the main
    model M: DKD trains M plus ``members`` auxiliaries (M + 3 voters, as in the paper's tables) so that it
    votes with as many networks as the other ensembles have.
    """
    import torch

    from ensemble_core.ensemble import combine_rule
    from ensemble_core.methods import get_method

    k = int(budget["members"])
    rule = combine_rule(get_method(method).default_combine)
    if rule.vote is None:
        return k
    m = k
    while len(rule.vote.voters(torch.zeros(m, 1, 1))) < k:
        m += 1
    return m


def reproduce_argv(method: str, dataset: str, budget: dict[str, Any], runs_dir: Path, threads: int) -> list[str]:
    """The ``reproduce`` command line for one leaderboard cell (also printed on the page, so anyone can rerun it)."""
    return [method, "--dataset", dataset, "--epochs", str(budget["epochs"]),
            "--members", str(members_for(method, budget)), "--baseline-members", str(budget["members"]),
            "--train-subset", str(budget["train_subset"]), "--transfer-examples", str(budget["transfer_examples"]),
            "--wb-examples", str(budget["wb_examples"]), "--runs-dir", str(runs_dir / "reproduce"),
            "--out", str(runs_dir / "pages" / f"{dataset}-{method}.md"), "--threads", str(threads)]


def _budget_flags(budget: dict[str, Any]) -> str:
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in budget.items() if BUDGET.get(k) != v)


def _brief(r: dict[str, Any], *, among: bool = False) -> dict[str, Any]:
    out = {"attack": r["attack"], "eps": r["eps"], "robust_acc": r["robust_acc"], "n_examples": r["n_examples"],
           "unreliable": r["unreliable"]}
    if among:
        out["robust_acc_among_correct"] = r.get("robust_acc_among_correct")
    return out


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return sum(v) / len(v) if v else None


def summarise(payload: dict[str, Any], budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """The leaderboard row of one finished reproduction (its ``reproduce`` JSON).

    Figures: ``any_attack`` (per image the worst case over every white-box and transfer attack, on the
    white-box images) per eps and their mean (the ranking key); ``transfer`` per attack and eps (all
    surrogates) with the 16-cell mean, and per surrogate group; ``white_box`` attack by attack with the
    white-box worst case; the earlier pages' headline (PGD-50 x 5, CE) kept as ``white_box_pgd_ce``.
    """
    res = payload["target"]
    clean = res["clean"]["target"]
    recs = [r for r in res["records"] if r["model"] == "target" and r["norm"] == "Linf"]
    tr_all = [r for r in recs if r["threat"] == "transfer" and r.get("surrogate_group", "all") == "all"]
    transfer = [_brief(r, among=True) for r in tr_all if not r["attack"].startswith("worst case")]
    transfer_worst = [_brief(r, among=True) for r in tr_all if r["attack"].startswith("worst case")]
    by_group: dict[str, list[dict[str, Any]]] = {}
    worst_by_group: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        g = r.get("surrogate_group", "all")
        if r["threat"] == "transfer" and g != "all":
            (worst_by_group if r["attack"].startswith("worst case") else by_group).setdefault(g, []).append(
                _brief(r, among=True))
    white = [_brief(r) for r in recs if r["threat"] in ("white-box", "gradient-free")]
    wb_worst = [_brief(r) for r in recs if r["threat"] == "worst-case" and r["attack"].startswith("worst case")]
    any_attack = [_brief(r) for r in recs if r["threat"] == "worst-case" and r["attack"].startswith("any attack")]
    first = res["spec"]["attacks"][0]
    from ensemble_core.evaluation.attacks import attack_label
    from ensemble_core.spec import AttackSpec

    headline_label = attack_label(AttackSpec.model_validate(first))
    mt = res.get("member_transfer", {}).get("target") or {}
    model = res["models"]["target"]
    return {
        "method": payload["method"], "status": "done", "hyperparameters": payload["hyperparameters"],
        "members": payload.get("members"),
        "deployed_rule": clean["deployed_rule"], "attacked_rule": model.get("attacked_rule"),
        "clean_acc": clean.get("clean_acc_transfer_slice"), "clean_acc_white_box_slice": clean["clean_acc"],
        "member_clean_acc": clean.get("member_clean_acc_transfer_slice", clean["member_clean_acc"]),
        "member_clean_acc_white_box_slice": clean["member_clean_acc"],
        "any_attack": any_attack, "any_attack_mean": _mean([r["robust_acc"] for r in any_attack]),
        "transfer": transfer, "transfer_mean": _mean([t["robust_acc"] for t in transfer]),
        "transfer_worst": transfer_worst,
        "transfer_by_group": {g: {"records": v, "mean": _mean([t["robust_acc"] for t in v]),
                                  "worst": worst_by_group.get(g, [])} for g, v in by_group.items()},
        "white_box": white, "white_box_worst": wb_worst,
        "white_box_pgd_ce": [w for w in white if w["attack"] == headline_label],
        "member_transfer_rate": mt.get("mean_offdiagonal_transfer_rate"),
        "flags": [{"name": f["name"], "attack": f.get("attack"), "message": f["message"]} for f in res["flags"]],
        "train_time_s": (payload.get("train_time_s") or {}).get(payload["method"]),
        "evaluation_time_s": sum(res.get("timings_s", {}).values()),
        "code_version": res.get("code_version"),
        "command": f"python -m ensemble_core.leaderboard --datasets {payload['dataset']} --methods "
                   f"{payload['method']}" + _budget_flags(budget or BUDGET),
    }


def _cell_path(runs_dir: Path, dataset: str, method: str) -> Path:
    return runs_dir / "cells" / f"{dataset}-{method}.json"


def budget_dir(runs_dir: Path, budget: dict[str, Any]) -> Path:
    """Cells of different budgets never mix: each budget has its own directory."""
    from ensemble_core.reproduce import _digest

    return runs_dir / f"budget-{_digest(budget, 8)}"


def run_cell(method: str, dataset: str, budget: dict[str, Any], runs_dir: Path, threads: int) -> dict[str, Any]:
    """Run (or reuse) one method on one data set; a failure is recorded as a row with its error, not raised."""
    from ensemble_core.reproduce import run_reproduction

    argv = reproduce_argv(method, dataset, budget, runs_dir, threads)
    t0 = time.perf_counter()
    _log(f"{DS_NAME[dataset]} / {method}: python -m ensemble_core.reproduce {' '.join(argv)}")
    try:
        row = summarise(run_reproduction(argv), budget)
    except Exception as e:  # one method's failure must not take the others down; it is reported on the page
        _log(f"{DS_NAME[dataset]} / {method} FAILED: {e!r}")
        row = {"method": method, "status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)}
    row["wall_time_s"] = time.perf_counter() - t0
    path = _cell_path(runs_dir, dataset, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def any_attack_wb_mean(row: dict[str, Any]) -> float | None:
    """The ranking key: the mean 'any attack' robust accuracy over the eps where the white-box attacks ran (at a
    transfer-only eps the 'any attack' figure holds only transfer and smaller-eps white-box attacks)."""
    w_eps = {w["eps"] for w in row.get("white_box_worst", [])}
    return _mean([t["robust_acc"] for t in row.get("any_attack", []) if t["eps"] in w_eps])


DERIVED_KEYS = ("rank", "any_attack_wb_mean", "transfer_mean_vs_baseline", "any_attack_mean_vs_baseline",
                "clean_acc_vs_baseline")


def restore_cells(published: Path, runs_dir: Path, datasets: list[str], methods: list[str],
                  budget: dict[str, Any]) -> list[str]:
    """Cells missing from ``runs_dir`` taken back from a published ``leaderboard.json``, where that is exact.

    A row is restored only when the document has the same format and budget and the row's evaluation code
    fingerprint equals today's (:func:`ensemble_core.evaluation.codeversion.evaluation_code_fingerprint`): the
    figures are then what a rerun of the same deterministic pipeline would write, so a run split over several
    sessions (the runs directory is a cache, not kept) goes on where the published page stopped. Returns the
    restored ``dataset/method`` names.
    """
    from ensemble_core.evaluation.codeversion import evaluation_code_fingerprint

    if not published.exists():
        return []
    doc = json.loads(published.read_text())
    if doc.get("format") != FORMAT or {k: doc.get("budget", {}).get(k) for k in budget} != budget:
        return []
    today = evaluation_code_fingerprint()
    restored = []
    for ds in datasets:
        rows = {r.get("method"): r for r in doc.get("datasets", {}).get(ds, {}).get("rows", [])}
        for m in methods:
            row, cell = rows.get(m), _cell_path(runs_dir, ds, m)
            if cell.exists() or row is None or row.get("status") != "done" or \
                    (row.get("code_version") or {}).get("evaluation_code") != today:
                continue
            cell.parent.mkdir(parents=True, exist_ok=True)
            kept = {k: v for k, v in row.items() if k not in DERIVED_KEYS}
            cell.write_text(json.dumps(kept | {"restored_from": str(published.name)}, indent=1))
            restored.append(f"{ds}/{m}")
    return restored


def collect(runs_dir: Path, datasets: list[str], methods: list[str], budget: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard document from the cells on disk (methods without a cell are listed as ``not run``)."""
    boards = {}
    for ds in datasets:
        rows = []
        for m in methods:
            p = _cell_path(runs_dir, ds, m)
            rows.append(json.loads(p.read_text()) if p.exists() else {"method": m, "status": "not run"})
        rows = [r if r.get("status") != "done" or "any_attack_mean" in r else
                {"method": r["method"], "status": "stale", "error": "made by an earlier evaluation (no 'any attack' "
                                                                     "figure); rerun with --rerun"} for r in rows]
        for r in rows:
            if r["status"] == "done":
                r["any_attack_wb_mean"] = any_attack_wb_mean(r)
        base = next((r for r in rows if r["method"] == "baseline" and r["status"] == "done"), None)
        for r in rows:
            if r["status"] == "done" and base is not None:
                r["transfer_mean_vs_baseline"] = r["transfer_mean"] - base["transfer_mean"]
                r["any_attack_mean_vs_baseline"] = (r["any_attack_wb_mean"] - base["any_attack_wb_mean"]
                                                    if None not in (r["any_attack_wb_mean"], base["any_attack_wb_mean"])
                                                    else None)
                r["clean_acc_vs_baseline"] = r["clean_acc"] - base["clean_acc"]
        rank = sorted((r for r in rows if r["status"] == "done"),
                      key=lambda r: (-(r["any_attack_wb_mean"] or 0.0), -(r["transfer_mean"] or 0.0)))
        for i, r in enumerate(rank, 1):
            r["rank"] = i
        rows.sort(key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["method"]))
        boards[ds] = {"dataset": ds, "rows": rows}
    return {
        "format": FORMAT, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget": budget | {"architecture": "lenet5", "optimizer": "adam lr 1e-3, weight decay 1e-4",
                            "batch_size": 128, "train_seed": 0, "evaluation_seed": 0,
                            "protocol_epochs": PROTOCOL_EPOCHS},
        "protocol": {
            "transfer": "surrogates: baseline ensembles of 3 (seed 1) and 5 (seed 2) members, same budget, and the "
                        "method's own configuration trained with seed 1 (same-method); FGSM and BIM/MIM/PGD-10 (step "
                        "eps/5, MIM momentum 1.0, PGD random start with 3 seeds), CE and CW margin (kappa 0.1), "
                        "crafted on each surrogate's log of mean probabilities; per image the worst case over every "
                        "surrogate, both losses and every seed",
            "white_box": "against the deployed rule (its differentiable view where it is not differentiable; every "
                         "iterate of our iterative attacks scored on the rule): PGD-50 x 5 restarts (step eps/10) with "
                         "CE, and with the CW and DLR margins; FGSM (CE + CW); Square (1,000 queries, margin "
                         "loss); the ensemble-aware MORA-style attack (100 steps, CE and DLR); the vote-aware "
                         "losses on votes (PGD-50 x 5, vote hinge + soft vote); the reference AutoAttack "
                         "(standard, pyautoattack 0.2.0, with its own 5,000-query Square) at the middle eps only; the "
                         "convergence check (PGD-100, same starts) on every image, merged into the worst case",
            "images": "PROTOCOL report subset (test indices after the 1,000-image selection subset of the "
                      "random.seed(0) shuffle): the first transfer_examples for transfer, the first wb_examples of "
                      "those for white-box and for 'any attack'",
            "ranking": "mean over the white-box eps (MNIST 0.1, 0.2, 0.3; Fashion-MNIST 0.05, 0.1, 0.15) of the "
                       "'any attack' robust accuracy: per image the worst case over every white-box and transfer "
                       "attack at that eps or below; the transfer-only and white-box-only figures beside it. The "
                       "'any attack' figures at the transfer-only eps (MNIST 0.15, 0.25; Fashion-MNIST 0.08, 0.2) "
                       "are in leaderboard.json but neither shown nor ranked: no white-box attack ran there, so "
                       "they are upper bounds from weaker attacks"},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "code_versions": sorted({json.dumps(r.get("code_version") or {}, sort_keys=True)
                                 for b in boards.values() for r in b["rows"] if r.get("status") == "done"}),
        "datasets": boards,
    }


def campaign_headlines(results_dir: Path | None = None) -> list[dict[str, Any]]:
    """The headline: every declared campaign's summary from its records under ``results_dir`` (default the
    project's ``docs/results``), as :func:`ensemble_core.campaign.headline` makes it (issue #21: the full-budget
    campaigns head the leaderboard; the 2-epoch board below them is the quick mode)."""
    from ensemble_core.campaign import CAMPAIGNS, Paths, headline

    return [headline(c, Paths.of(c, results_dir=results_dir)) for c in CAMPAIGNS.values()]


def refresh_headline(out_dir: Path, results_dir: Path | None = None) -> list[Path]:
    """Rewrite the headline of the published ``leaderboard.json`` / ``.md`` in ``out_dir`` from the campaigns'
    records (``results_dir``, default ``out_dir``), leaving the quick-mode rows exactly as published (they are
    regenerated only by running the leaderboard). Returns the files written; none when ``out_dir`` holds no
    leaderboard of this format. The campaign runner calls it after every recorded unit."""
    path = out_dir / "leaderboard.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        return []
    doc["headline"] = campaign_headlines(results_dir or out_dir)
    doc["headline_generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    md = out_dir / "leaderboard.md"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md.write_text(render(doc))
    return [path, md]


def _ms(st: dict[str, Any] | None) -> str:
    """``mean ± sd (n k)`` in % from a headline statistic; ``–`` for none."""
    if not st:
        return "–"
    sd = f" ± {100 * st['sd']:.1f}" if st.get("sd") is not None else ""
    return f"{100 * st['mean']:.1f}{sd} (n {st['n']})"


def render_headline(heads: list[dict[str, Any]]) -> list[str]:
    """The headline section of ``leaderboard.md``: per campaign its rows at the papers' budget (mean ± sd over
    training seeds), or what is recorded so far."""
    lines = ["## Headline: the papers' tables at the papers' budgets (campaigns)", "",
             "Each campaign trains a paper's rows at the paper's budget (or the largest that fits, stated below) "
             "with every declared training seed; each figure is the mean ± sd over the seeds recorded (n = how "
             "many). *Transfer*: the per-image worst case over every transfer attack (PROTOCOL's set: FGSM; BIM, "
             "MIM and PGD with 10 steps of ε/5, PGD from 3 random starts; CE and the CW margin, κ 0.1; plus a "
             "paper's own where its campaign declares one) from the campaign's paper-group surrogates at that ε "
             "or below, with the paper's "
             "denominator (the column says which); *white-box*: the worst case over every white-box attack of the "
             "campaign's suite, on the seeds it ran on. Each campaign's page has every attack, ε, slice, surrogate "
             "and seed, and the paper's figures beside ours.", ""]
    for h in heads:
        tu, eu = h["train_units"], h["eval_units"]
        lines += [f"### `{h['campaign']}`: {h['title']}", "",
                  f"[{h['page']}]({h['page']}); {tu['recorded']} of {tu['declared']} training units and "
                  f"{eu['recorded']} of {eu['declared']} evaluation units recorded. {h['budget']}", ""]
        stale = h.get("stale_evaluations") or []
        if stale:
            one = len(stale) == 1
            lines += [f"**{len(stale)} of the {eu['recorded']} evaluation records {'was' if one else 'were'} made "
                      f"with earlier evaluation code** ({', '.join(f'`{u}`' for u in stale)}): the campaign re-runs "
                      f"{'it' if one else 'them'}, and until then {'its' if one else 'their'} cells below are that "
                      "code's (the campaign's page names each code digest).", ""]
        rows = [r for r in h["rows"] if r["seeds_trained"]]
        if not rows:
            lines += ["No training unit recorded yet.", ""]
            continue
        evaluated = any(r["seeds_evaluated"] for r in h["rows"])
        if not evaluated:
            pre = h.get("preliminary_page")
            seen = f" (preliminary scores outside the campaign's records: [{pre}]({pre}))" if pre else ""
            lines += ["No evaluation unit recorded yet (the campaign's `--phase eval`): until then the quick mode "
                      f"below is the only evaluated board{seen}. Clean accuracy of what is trained (the deployed "
                      "rule, the 9,000-image report subset):", "",
                      "| row | configuration | seeds trained | clean % |", "|---|---|---|---|"]
            lines += [f"| {r['label']} | `{r['configuration']}` | {', '.join(map(str, r['seeds_trained']))} | "
                      f"{_ms(r['clean_acc'])} |" for r in rows]
            lines.append("")
            continue
        ev = h.get("evaluation") or {}
        if ev:
            wb = (f", white-box on the first {ev['white_box_images']:,} of them ({', '.join(ev['white_box_attacks'])})"
                  if ev.get("white_box_images") else "")
            lines += [f"Transfer on a seeded {ev['transfer_images']:,}-image slice of the {ev['split']} subset{wb}; "
                      f"evaluation seed {ev['seed']}; every attack's parameters in each record's `evaluation_spec`.",
                      ""]
        t_eps = sorted({c["eps"] for r in rows for c in r["transfer_worst"]})
        w_eps = sorted({c["eps"] for r in rows for c in r["white_box_worst"]})
        key = "clean_correct" if h["paper_denominator"] == "clean_correct" else "all"
        den = "clean-correct" if key == "clean_correct" else "all images"
        head = (["row", "seeds trained", "seeds evaluated", "clean %"]
                + [f"transfer ε={e:g} ({den})" for e in t_eps] + [f"white-box ε={e:g} (all images)" for e in w_eps]
                + ["paper"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            tw = {c["eps"]: c for c in r["transfer_worst"]}
            ww = {c["eps"]: c for c in r["white_box_worst"]}
            pp = r.get("paper")
            paper = ("–" if not pp else ", ".join(f"{pp['attack']} ε {e:g}: {v:.2f}"
                                                   for e, v in zip(pp["eps"], pp["values"], strict=False)))
            lines.append(f"| {r['label']} | {', '.join(map(str, r['seeds_trained']))} | "
                         f"{', '.join(map(str, r['seeds_evaluated'])) or '–'} | {_ms(r['clean_acc'])} | "
                         + " | ".join(_ms(tw[e][key]) if e in tw else "–" for e in t_eps)
                         + (" | " if w_eps else "") + " | ".join(_ms(ww[e]["all"]) if e in ww else "–" for e in w_eps)
                         + f" | {paper} |")
        lines += ["", f"*paper*: {h['paper_table']}, one attack family's figures (ours is the per-image worst case "
                  "over every family, so it is at most our own figure for any one family; those, beside the "
                  "paper's, are on the campaign page).", ""]
    return lines


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _flagged(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    return _pct(r["robust_acc"]) + (" ⚠" if r["unreliable"] else "")


def _code_line(code_versions: list[str]) -> str:
    """The evaluation code behind the rows: one entry per fingerprint, with the git commits that carried it."""
    versions = [json.loads(v) for v in code_versions]
    if not versions:
        return "–"
    by_code: dict[str, set[str]] = {}
    for v in versions:
        by_code.setdefault(str(v.get("evaluation_code")), set()).add(str(v.get("git_commit")))
    code = "; ".join(f"`{fp}` (git {', '.join(sorted(commits))}"
                     + (": the fingerprinted evaluation files are identical at these commits)" if len(commits) > 1
                        else ")") for fp, commits in by_code.items())
    return code + (" — one version for every row." if len(by_code) == 1
                   else f" — {len(by_code)} versions of the evaluation code: compare rows of different versions "
                        "with care.")


def render(doc: dict[str, Any]) -> str:
    """``docs/results/leaderboard.md`` from the leaderboard document."""
    b = doc["budget"]
    code = _code_line(doc.get("code_versions", []))
    lines = ["# Leaderboard", "",
             "Generated by `python -m ensemble_core.leaderboard` (also `robust-ensembles leaderboard`); served as "
             "JSON at `GET /v1/leaderboard`. Quick mode generated " + doc["generated_at"]
             + (f"; headline from the campaigns' records as of {doc['headline_generated_at']}"
                if doc.get("headline_generated_at") else "") + ".", ""]
    lines += render_headline(doc.get("headline", []))
    quick = f"{b['epochs']} epoch{_s(b['epochs'])}"
    lines += [f"## Quick mode: every method, one pipeline, {quick}, one attack protocol", "",
             f"**Budget, identical for every method and the baseline (the quick budget).** `{b['architecture']}`, "
             f"{b['members']} members, a seeded {b['train_subset']:,}-image subset of the training set, "
             f"**{b['epochs']} epoch{_s(b['epochs'])}** (PROTOCOL.md "
             f"asks for the full 60k and 20 epochs on MNIST, 30 on Fashion-MNIST: this budget is reduced so that all "
             f"methods fit on a 2-core CPU machine; the numbers rank methods at this budget, they "
             f"are not the methods' converged robustness), {b['optimizer']}, batch {b['batch_size']}, training seed "
             f"{b['train_seed']}, each method's default hyperparameters for the data set (listed per row in "
             f"`leaderboard.json`). One training seed per model: differences of a point or two are within seed noise.",
             "",
             f"**Attacks.** Transfer ({b['transfer_examples']:,} images): {doc['protocol']['transfer']}. White-box "
             f"({b['wb_examples']} images): {doc['protocol']['white_box']}. Images: {doc['protocol']['images']}. "
             f"Evaluation seed {b['evaluation_seed']}. Every attack and parameter: docs/evaluation.md.", "",
             f"**Ranking.** By {doc['protocol']['ranking']}. ⚠ marks a figure the evaluation flagged as unreliable; "
             "the flags are listed under each table.", "",
             f"**Evaluation code.** {code}", "",
             "What the tables do and do not show, method by method: [leaderboard-notes.md](leaderboard-notes.md).",
             "", f"**Machine.** {doc['machine'].get('cpus')} CPU cores (host `{doc['machine'].get('host')}`); "
             "`train min` is each target's training wall time there (the baseline and surrogates are shared).", ""]
    for ds, board in doc["datasets"].items():
        rows = board["rows"]
        done = [r for r in rows if r["status"] == "done"]
        lines += [f"### {DS_NAME.get(ds, ds)} (quick mode)", ""]
        if not done:
            lines += ["No method has finished on this data set with the current evaluation yet.", ""]
            for r in rows:
                if r["status"] != "done":
                    lines.append(f"- `{r['method']}`: {r['status']}" + (f" ({r['error'][:160]})" if r.get("error")
                                                                        else ""))
            lines.append("")
            continue
        t_eps = sorted({t["eps"] for r in done for t in r["transfer_worst"]})
        w_eps = sorted({w["eps"] for r in done for w in r["white_box_worst"]})
        a_eps = w_eps  # 'any attack' where every attack ran (see the ranking)
        head = (["rank", "method", "clean"] + [f"any attack ε={e:g}" for e in a_eps] + ["any-attack mean"]
                + [f"transfer ε={e:g}" for e in t_eps] + ["transfer mean (16 cells)"]
                + [f"white-box ε={e:g}" for e in w_eps] + ["member transfer", "train min"])
        lines += ["Robust accuracy (%) over all images of the slice: *any attack* and *white-box* (the per-image "
                  "worst case over every white-box attack) on the white-box images, *transfer* (the per-image worst "
                  "case over every transfer attack and surrogate) on the transfer slice.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if r["status"] != "done":
                lines.append(f"| – | {r['method']} | {r['status']}"
                             + (f": {r['error'][:120]}" if r.get("error") else "") + " |" + " |" * (len(head) - 3))
                continue
            an = {t["eps"]: t for t in r["any_attack"]}
            tw = {t["eps"]: t for t in r["transfer_worst"]}
            ww = {t["eps"]: t for t in r["white_box_worst"]}
            cells = [str(r["rank"]), f"`{r['method']}`", _pct(r["clean_acc"])]
            cells += [_flagged(an.get(e)) for e in a_eps] + [f"**{_pct(r['any_attack_wb_mean'])}**"]
            cells += [_flagged(tw.get(e)) for e in t_eps] + [_pct(r["transfer_mean"])]
            cells += [_flagged(ww.get(e)) for e in w_eps]
            tt = r.get("train_time_s")
            cells += [_pct(r.get("member_transfer_rate")), "–" if tt is None else f"{tt / 60:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        # attack by attack, white-box, at every eps
        attacks = list(dict.fromkeys(w["attack"] for r in done for w in r["white_box"]))
        lines += ["White-box, attack by attack (%), on the white-box images (the convergence-check rows on the "
                  "images they ran on); – = not run on that rule:", ""]
        head2 = ["method"] + [f"{a} ε={e:g}" for a in attacks for e in w_eps
                              if any(w["attack"] == a and w["eps"] == e for r in done for w in r["white_box"])]
        cols2 = [(a, e) for a in attacks for e in w_eps
                 if any(w["attack"] == a and w["eps"] == e for r in done for w in r["white_box"])]
        lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
        for r in done:
            by = {(w["attack"], w["eps"]): w for w in r["white_box"]}
            lines.append(f"| `{r['method']}` | " + " | ".join(_flagged(by.get(c)) for c in cols2) + " |")
        lines.append("")
        groups = sorted({g for r in done for g in r.get("transfer_by_group", {})})
        if groups:
            lines += ["Transfer mean (16 cells, %) by surrogate group: " + "; ".join(
                f"`{r['method']}` " + (", ".join(f"{g} {_pct(r['transfer_by_group'][g]['mean'])}"
                                                  for g in groups if g in r.get("transfer_by_group", {}))
                                       or "only baseline surrogates (one of them its own configuration, seed 1)")
                for r in done) + ".", ""]
        flags = [f"- `{r['method']}`: `{f['name']}`" + (f" ({f['attack']})" if f.get("attack") else "")
                 + f": {f['message']}" for r in done for f in r["flags"]]
        lines += ["Flags: " + ("none fired." if not flags else ""), *flags, ""]
        lines += ["Hyperparameters and the command that reproduces each row:", ""]
        for r in done:
            members = ", ".join(_pct(a) for a in r.get("member_clean_acc", []))
            lines.append(f"- `{r['method']}` `{json.dumps(r['hyperparameters'], sort_keys=True)}`, "
                         f"{r.get('members') or b['members']} networks, deployed `{r['deployed_rule']}`, members' "
                         f"clean accuracy (transfer slice, as *clean*) {members} %: `{r['command']}`")
        lines.append("")
    lines += ["Columns: *clean* is the deployed rule's accuracy on the transfer slice; *any-attack mean* averages the "
              "any-attack columns (the white-box eps; the ranking key); *transfer mean* averages the 16 transfer cells "
              "(FGSM, BIM, MIM, PGD × 4 ε, every surrogate); *member transfer* is the mean share of PGD-10 examples "
              "crafted on one member that also fool another (lower = more diverse); *train min* is the training "
              "wall time on the shared machine.", ""]
    return "\n".join(lines)


def render_comparison(old: dict[str, Any], new: dict[str, Any], dataset: str = "mnist") -> str:
    """The page that sets the earlier evaluation's headline figures beside the reviewer-grade evaluation's
    per-image worst case, attack by attack (``docs/results/evaluation-upgrade.md``)."""
    o_rows = {r["method"]: r for r in old["datasets"][dataset]["rows"] if r.get("status") == "done"}
    n_rows = [r for r in new["datasets"][dataset]["rows"] if r.get("status") == "done"]
    ds = DS_NAME.get(dataset, dataset)
    b = new["budget"]
    code = _code_line(new.get("code_versions", []))
    lines = [f"# The evaluation at the reviewer's bar: what each attack changes ({ds})", "",
             f"Generated by `python -m ensemble_core.leaderboard --render-only --compare-with "
             f"docs/results/archive/leaderboard-2026-11-22.json` on {new['generated_at']}. Both evaluations score "
             f"the same checkpoints: the leaderboard's budget ({b['architecture']}, {b['members']} members, a seeded "
             f"{b['train_subset']:,}-image training subset, {b['epochs']} epochs, Adam 1e-3, weight decay 1e-4, "
             "batch 128, training seed 0 — the quick budget, one training seed per model), retrained "
             "deterministically from the same specs (the clean accuracies match the earlier page's), except the "
             "rows listed under the first table.", "",
             f"**Before** ({old['generated_at']}): transfer from the two baseline surrogates crafted on their mean "
             "logits (PGD with one seed), ranked by the transfer mean; white-box PGD-50 x 5 restarts with CE, "
             "only the final iterate scored; no AutoAttack. **Now**: the reviewer's "
             "set of docs/evaluation.md — every iterate scored on the deployed rule, margin losses, FGSM, Square, "
             "the ensemble-aware attack, the vote-aware losses on votes, the reference AutoAttack at the middle eps, "
             "the convergence check merged into the worst case; transfer crafted on the surrogates' log of mean "
             "probabilities with 3 PGD seeds, plus a same-method surrogate; ranked by the mean over the white-box "
             "eps of the per-image worst case over everything (*any attack*). At the eps where only transfer "
             "attacks ran (MNIST 0.15, 0.25) the any-attack figure is an upper bound from weaker attacks: it is "
             "not shown here. Evaluation code: " + code, "",
             f"White-box figures are on the first {b['wb_examples']} report images, transfer figures on the first "
             f"{b['transfer_examples']:,}; robust accuracy (%) over all images; ⚠ = flagged unreliable.", ""]
    # 1. headline: before vs now
    w_eps = sorted({w["eps"] for r in n_rows for w in r["white_box_worst"]})
    a_eps = w_eps  # any attack only where white-box attacks ran (elsewhere an upper bound)
    head = (["method", "rank before → now", "transfer mean before", "transfer mean now (baseline surrogates)",
             "transfer mean now (all surrogates)"]
            + [f"PGD-50 CE ε={e:g} before" for e in w_eps] + [f"white-box worst ε={e:g} now" for e in w_eps]
            + [f"any attack ε={e:g}" for e in a_eps])
    lines += ["## Headline figures, before and now", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in n_rows:
        o = o_rows.get(r["method"], {})
        ow = {w["eps"]: w for w in o.get("white_box", [])}
        ww = {w["eps"]: w for w in r["white_box_worst"]}
        an = {w["eps"]: w for w in r["any_attack"]}
        base = (r.get("transfer_by_group", {}).get("baseline") or {}).get("mean")
        cells = [f"`{r['method']}`", f"{o.get('rank', '–')} → {r['rank']}", _pct(o.get("transfer_mean")),
                 _pct(base if base is not None else r["transfer_mean"]), _pct(r["transfer_mean"])]
        cells += [_flagged(ow.get(e)) for e in w_eps] + [_flagged(ww.get(e)) for e in w_eps]
        cells += [_flagged(an.get(e)) for e in a_eps]
        lines.append("| " + " | ".join(cells) + " |")
    changed = []
    for r in n_rows:
        o = o_rows.get(r["method"])
        if o is None:
            continue
        n_old, n_new = len(o.get("member_clean_acc") or []), len(r.get("member_clean_acc") or [])
        if n_old != n_new or abs(float(o.get("clean_acc", 0.0)) - float(r.get("clean_acc", 0.0))) > 1e-9:
            changed.append(f"`{r['method']}` (before {n_old} networks, {_pct(o.get('clean_acc'))} % clean; now "
                           f"{n_new} networks, {_pct(r.get('clean_acc'))} % clean)")
    lines += [""]
    if changed:
        lines += ["**Not the same checkpoint before and now** (the method's default configuration changed between "
                  "the two evaluations, so its *before* columns describe another model): " + "; ".join(changed)
                  + ".", ""]
    lines += ["For the baseline, the baseline surrogates include its own configuration with another seed (the "
              "3-member baseline of seed 1), so it has no separate same-method group.", ""]
    # 2. attack by attack, per white-box eps
    attacks = list(dict.fromkeys(w["attack"] for r in n_rows for w in r["white_box"]))
    for e in w_eps:
        cols = [a for a in attacks if any(w["attack"] == a and w["eps"] == e for r in n_rows for w in r["white_box"])]
        head = (["method", "PGD-50 CE before"] + cols + ["white-box worst", "transfer worst (baseline surr.)",
                                                         "transfer worst (same-method)", "transfer worst (all)",
                                                         "**any attack**"])
        lines += [f"## Attack by attack at ε = {e:g}", "",
                  "Each white-box column is that attack alone (its losses and restarts, per image); *white-box "
                  "worst* is the per-image worst case over all of them; the transfer columns are the per-image "
                  "worst case over every transfer attack at ε or below; *any attack* over everything. Where a "
                  "method has a transfer ε equal to this ε it is shown; transfer runs at 0.1/0.15/0.2/0.25 on MNIST "
                  "(– where this ε is not among them).", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in n_rows:
            o = {w["eps"]: w for w in o_rows.get(r["method"], {}).get("white_box", [])}
            by = {w["attack"]: w for w in r["white_box"] if w["eps"] == e}
            ww = {w["eps"]: w for w in r["white_box_worst"]}
            tg = r.get("transfer_by_group", {})
            tb = {w["eps"]: w for w in (tg.get("baseline") or {}).get("worst", [])}
            ts = {w["eps"]: w for w in (tg.get("same-method") or {}).get("worst", [])}
            ta = {w["eps"]: w for w in r["transfer_worst"]}
            an = {w["eps"]: w for w in r["any_attack"]}
            if not tb and r["method"] == "baseline":
                tb = ta
            cells = [f"`{r['method']}`", _flagged(o.get(e))] + [_flagged(by.get(a)) for a in cols]
            cells += [_flagged(ww.get(e)), _flagged(tb.get(e)), _flagged(ts.get(e)), _flagged(ta.get(e)),
                      f"**{_flagged(an.get(e))}**"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the missing cells (or ``--render-only``) and write the markdown and JSON."""
    p = argparse.ArgumentParser(prog="leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: mnist,fashion_mnist)")
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--runs-dir", default=None, help="cache directory (default runs/leaderboard in the project)")
    p.add_argument("--out-dir", default=None, help="where leaderboard.md/.json go (default docs/results)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--rerun", action="store_true", help="rerun cells that already have a result")
    p.add_argument("--render-only", action="store_true", help="only rebuild the tables from finished cells")
    p.add_argument("--headline-only", action="store_true",
                   help="only rewrite the headline (the campaigns' records) of the published page, its quick-mode "
                        "rows untouched")
    p.add_argument("--compare-with", metavar="JSON", help="an earlier leaderboard.json: also write "
                                                          "evaluation-upgrade.md, its figures beside the new ones")
    for key, val in BUDGET.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=val,
                       help=f"budget override (default {val}; the page states the budget used)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    budget = {k: getattr(args, k) for k in BUDGET}
    from ensemble_core.methods import method_names

    known = method_names()
    methods = [m for m in ORDER if m in known] + sorted(set(known) - set(ORDER))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in known]
        if unknown:
            p.error(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
        run_methods = [m for m in methods if m in wanted]
    else:
        run_methods = methods
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        p.error(f"unknown data set(s) {', '.join(bad)}; expected some of {', '.join(DATASETS)}")
    root = _project_root()
    runs_dir = budget_dir(Path(args.runs_dir) if args.runs_dir else root / "runs" / "leaderboard", budget)
    out_dir = Path(args.out_dir) if args.out_dir else root / "docs" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.headline_only:
        written = refresh_headline(out_dir, root / "docs" / "results")
        if not written:
            p.error(f"--headline-only: no {FORMAT} leaderboard.json in {out_dir}")
        _log(f"wrote the headline of {', '.join(map(str, written))}")
        return 0

    def write() -> None:
        doc = collect(runs_dir, list(DATASETS), methods, budget)  # every data set: runs may be split by data set
        doc["headline"] = campaign_headlines()  # the campaigns' records in the project's docs/results
        doc["headline_generated_at"] = doc["generated_at"]
        (out_dir / "leaderboard.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out_dir / "leaderboard.md").write_text(render(doc))
        if args.compare_with:
            old = json.loads(Path(args.compare_with).read_text())
            pages = [render_comparison(old, doc, ds) for ds in DATASETS
                     if ds in old["datasets"] and any(r.get("status") == "done" for r in doc["datasets"][ds]["rows"])]
            (out_dir / "evaluation-upgrade.md").write_text("\n".join(pages) + "\n")

    # Every data set's and method's published rows, not only those asked for: the page is written whole, so a
    # run of one data set in a fresh checkout must not drop the other's rows. With --rerun the asked-for
    # cells are restored too and then run again over the restored figures.
    restored = restore_cells(out_dir / "leaderboard.json", runs_dir, list(DATASETS), methods, budget)
    if restored:
        _log(f"taken from the published {out_dir / 'leaderboard.json'} (same budget, same evaluation code "
             f"fingerprint): {', '.join(restored)}")
    if not args.render_only:
        for ds in datasets:
            for m in run_methods:
                cell = _cell_path(runs_dir, ds, m)
                if cell.exists() and not args.rerun and json.loads(cell.read_text())["status"] == "done":
                    _log(f"{DS_NAME[ds]} / {m}: done earlier ({cell})")
                    continue
                run_cell(m, ds, budget, runs_dir, args.threads)
                write()
    write()
    _log(f"wrote {out_dir / 'leaderboard.md'} and {out_dir / 'leaderboard.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
