"""``reproduce <method>``: the shared PROTOCOL.md reproduction at a reduced CPU budget.

    python -m ensemble_core.reproduce cldl            # or: robust-ensembles reproduce cldl
    python -m ensemble_core.reproduce pdd --hp alpha=2.0 --dataset fashion_mnist

Defaults, identical for every method: MNIST, ``lenet5``, 3 members, the full 60k training set, **3 epochs**
(PROTOCOL.md asks for 20 on MNIST and 30 on Fashion-MNIST; reduced so that five reproductions fit on the
shared 2-core machine, and said so in every output), Adam lr 1e-3, weight decay 1e-4, batch 128, training
seed 0, the method's default hyperparameters for the data set unless ``--hp key=value``.

What it does:

1. trains the method's target (``ensemble_core.training.train_local``, one process);
2. under a file lock, trains or reuses the budget's shared models -- the baseline target (same budget) and
   the transfer surrogates (baseline ensembles of 3 members, seed 1, and 5 members, seed 2) -- and the
   baseline's evaluation, and crafts the surrogates' adversarial examples once into a disk cache (they
   depend only on the surrogates, so every method is scored on the very same examples); concurrent
   reproductions of other methods wait for the lock and reuse all of it;
3. evaluates the target: black-box transfer (FGSM; BIM, MIM with momentum 1.0, PGD with random start, 10
   steps of eps/5; CE and the CW margin κ = 0.1 on the surrogate's log of mean probabilities; per-image
   worst case over both surrogates and both losses) on a 2,000-image seeded slice of the report subset, and
   white-box PGD-50 (step eps/10, 5 restarts, per-image worst case) against the deployed aggregation on a
   500-image slice of it (AutoAttack standard at the middle eps with ``--autoattack``), with the
   evaluation's automatic flags;
4. writes a markdown block to ``docs/methods/<method>-reproduction.md`` and every number as JSON under
   ``runs/reproduce/<dataset>-<budget-hash>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROTOCOL_EPOCHS = {"mnist": 20, "fashion_mnist": 30}
WHITE_BOX_EPS = {"mnist": [0.1, 0.2, 0.3], "fashion_mnist": [0.05, 0.1, 0.15]}
DATASETS = ("mnist", "fashion_mnist")
SURROGATES = (("baseline-3 (seed 1)", 3, 1), ("baseline-5 (seed 2)", 5, 2))


def _project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def _log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; says so while it waits for another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another reproduction holding the lock on {what} ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _parse_hp(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="a registered method name")
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--epochs", type=int, default=3, help="training epochs for every model (PROTOCOL: 20 MNIST, "
                                                        "30 Fashion-MNIST; default 3, reduced)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train every model on a seeded subset of this many training images (default: all 60k)")
    p.add_argument("--members", type=int, default=3, help="members of the method's target (and, by default, of the "
                                                          "baseline target)")
    p.add_argument("--baseline-members", type=int, default=None,
                   help="members of the baseline target (default: --members); e.g. DKD with --members 4 trains M and "
                        "3 voting auxiliaries, beside a 3-member baseline")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter override")
    p.add_argument("--quick", action="store_true", help="tiny budget for smoke tests (numbers not meaningful)")
    p.add_argument("--out", help="markdown output (default docs/methods/<method>-reproduction.md)")
    p.add_argument("--runs-dir", help="cache directory (default runs/reproduce in the project)")
    p.add_argument("--autoattack", choices=("all", "middle", "none"), default="middle",
                   help="the reference AutoAttack (standard) at the middle white-box eps (default), at every eps "
                        "(where time allows: a GPU), or none")
    p.add_argument("--no-same-method", action="store_true",
                   help="skip the same-method surrogate (the method trained again with seed 1)")
    p.add_argument("--wb-examples", type=int, default=None, help="white-box slice (default 500)")
    p.add_argument("--transfer-examples", type=int, default=None, help="transfer slice (default 2000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--retrain", action="store_true", help="retrain the method's target even if it is cached")
    return p


def train_spec(args: argparse.Namespace, method: str, members: int, seed: int,
               hp: dict[str, Any] | None = None) -> dict[str, Any]:
    milestones = [m for m in (10, 20) if m < args.epochs] if args.dataset == "fashion_mnist" else []
    spec: dict[str, Any] = {
        "method": method, "dataset": args.dataset, "architecture": "lenet5", "members": members,
        "epochs": args.epochs, "batch_size": 128, "seed": seed, "eval_subset": 2000, "val_size": 0,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
        "schedule": ({"name": "multistep", "milestones": milestones, "gamma": 0.1} if milestones
                     else {"name": "constant"}),
        "hyperparameters": hp or {}}
    if getattr(args, "train_subset", None):
        spec["train_subset"] = args.train_subset
    if args.quick:
        spec.update(train_subset=3000, epochs=min(args.epochs, 1), eval_subset=200,
                    schedule={"name": "constant"})
    return spec


def budget_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the shared baseline and surrogates depend on (their cache key)."""
    s = train_spec(args, "baseline", 0, 0)
    return {k: s[k] for k in ("dataset", "architecture", "epochs", "batch_size", "optimizer", "schedule")} | {
        "train_subset": s.get("train_subset"), "quick": bool(args.quick)}


def reviewer_attacks(dataset: str, *, quick: bool = False, autoattack: str = "middle") -> list[dict[str, Any]]:
    """The default white-box set (docs/evaluation.md, "The reviewer's set"), every attack against the deployed rule.

    In order (the first entry is the headline of the earlier pages, kept so that what each attack adds shows):
    PGD-50 (step eps/10, 5 restarts) with cross-entropy; the same with the CW and DLR margins; FGSM (CE + CW);
    Square (1,000 queries, margin loss; AutoAttack adds its own 5,000-query Square where it runs); the
    ensemble-aware attack (100 steps, CE + DLR); the vote-aware losses (PGD-50 x 5 with the vote hinge and the
    soft vote; skipped on rules that are not votes); the reference AutoAttack (standard) at the middle eps
    (``autoattack="all"``: every eps, for machines with the time, e.g. a GPU; ``"none"``). On this 2-core CPU
    one standard AutoAttack of a 3 x LeNet-5 ensemble that resists APGD-CE costs about 25 minutes per eps on
    200 images, hence the middle eps by default.
    The convergence check (PGD-100 with the same starts) runs at every eps on every white-box image and its
    breaks enter the worst case.
    """
    eps = WHITE_BOX_EPS[dataset]
    steps, restarts = (10, 2) if quick else (50, 5)
    pgd: dict[str, Any] = {"name": "pgd", "eps": eps, "steps": steps, "alpha_ratio": 0.1, "restarts": restarts,
                           "random_start": True}
    attacks: list[dict[str, Any]] = [
        {**pgd, "loss": "ce"},
        {**pgd, "losses": ["cw", "dlr"]},
        {"name": "fgsm", "eps": eps, "losses": ["ce", "cw"]},
        {"name": "square", "eps": eps, "n_queries": 300 if quick else 1000, "loss": "cw"},
        {"name": "mora", "eps": eps, "steps": 20 if quick else 100, "losses": ["ce", "dlr"]},
        {**pgd, "losses": ["vote", "softvote"]},
    ]
    if autoattack != "none":
        aa_eps = eps if autoattack == "all" else [eps[len(eps) // 2]]
        attacks.append({"name": "autoattack", "eps": aa_eps, "version": "standard"})
    return attacks


def evaluation_spec(dataset: str, checkpoint: str, *, quick: bool = False, transfer_examples: int | None = None,
                    wb_examples: int | None = None, autoattack: str = "middle") -> dict[str, Any]:
    """The evaluation of a reproduction, the leaderboard and the campaigns: :func:`reviewer_attacks` on a
    ``wb_examples`` slice (default 500; quick 100) of PROTOCOL's report subset, PROTOCOL's transfer set (crafted
    on each surrogate's log of mean probabilities, PGD with 3 seeds) on a ``transfer_examples`` slice (default
    2,000; quick 200) containing it, the convergence check on every white-box image, evaluation seed 0."""
    n_wb = wb_examples or (100 if quick else 500)
    n_tr = max(transfer_examples or (200 if quick else 2000), n_wb)
    return {"target_checkpoint": checkpoint, "n_examples": n_wb, "transfer_n_examples": n_tr, "split": "report",
            "seed": 0, "attacks": reviewer_attacks(dataset, quick=quick, autoattack=autoattack), "batch_size": 250,
            "among_correct": True, "checks": {"n_examples": n_wb}}


def eval_spec(args: argparse.Namespace, checkpoint: str) -> dict[str, Any]:
    """:func:`evaluation_spec` with a reproduction's command-line arguments."""
    return evaluation_spec(args.dataset, checkpoint, quick=args.quick, transfer_examples=args.transfer_examples,
                           wb_examples=args.wb_examples, autoattack=getattr(args, "autoattack", "middle"))


def _train(spec: dict[str, Any], out: Path, retrain: bool = False) -> Path:
    from ensemble_core.checkpoint import checkpoint_spec, load_checkpoint
    from ensemble_core.spec import TrainSpec
    from ensemble_core.training import train_local

    resolved = TrainSpec.model_validate(spec).resolved()
    final = out / "ensemble.pt"
    if final.exists() and not retrain:
        stored = checkpoint_spec(load_checkpoint(final))
        try:  # a checkpoint from before a new option was added: its spec with today's defaults filled in
            stored = TrainSpec.model_validate(stored).resolved() if stored is not None else None
        except Exception:  # noqa: BLE001 - an unreadable or foreign spec: retrain
            stored = None
        if stored == resolved:
            _log(f"reusing {final}")
            return final
        _log(f"{final} was trained with another spec; retraining")
    if retrain or (final.exists()):
        for f in ("ensemble.pt", "checkpoint.pt"):
            (out / f).unlink(missing_ok=True)
    t0 = time.perf_counter()
    _log(f"training {spec['method']} ({spec['members']} members, seed {spec['seed']}, {resolved['epochs']} epochs) "
         f"-> {out}")
    train_local(resolved, out, progress=False, log=lambda m: _log("  " + m))
    (out / "train_time_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return final


def _evaluate(args: argparse.Namespace, checkpoint: Path, surrogates: dict[str, str], out: Path,
              cache_dir: Path, groups: dict[str, str] | None = None) -> dict[str, Any]:
    from ensemble_core.evaluation import run_evaluation
    from ensemble_core.evaluation.codeversion import evaluation_code_fingerprint

    spec = eval_spec(args, str(checkpoint))
    key = _digest([spec, {k: str(v) for k, v in surrogates.items()}, groups or {}, checkpoint.stat().st_mtime_ns,
                   evaluation_code_fingerprint()])
    done = out / "results.json"
    if done.exists():
        prev = json.loads(done.read_text())
        if prev.get("reproduce_key") == key:
            _log(f"reusing evaluation {done}")
            return prev
    _log(f"evaluating {checkpoint} -> {out}")
    last = [0.0]

    def progress(frac: float, msg: str) -> None:
        if frac - last[0] >= 0.05 or frac >= 1.0:
            last[0] = frac
            _log(f"  {100 * frac:5.1f}% {msg}")

    result = run_evaluation(spec, checkpoint, surrogates=surrogates, out_dir=out, cache_dir=cache_dir,
                            progress=progress, log=lambda m: _log("  " + m), surrogate_groups=groups)
    result["reproduce_key"] = key
    from ensemble_core.evaluation.records import write_artifacts

    write_artifacts(result, out)
    return result


# ------------------------------------------------------------------------------------------ report


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _recs(result: dict[str, Any], threat: str, group: str | None = "all") -> list[dict[str, Any]]:
    return [r for r in result["records"] if r["model"] == "target" and r["threat"] == threat
            and (threat != "transfer" or group is None or r.get("surrogate_group", "all") == group)]


def _cell(r: dict[str, Any] | None) -> str:
    if r is None or r["robust_acc"] is None:
        return "–"
    return _pct(r["robust_acc"]) + (" ⚠" if r["unreliable"] else "")


def headline(result: dict[str, Any], norm: str = "Linf") -> dict[str, dict[float, dict[str, Any]]]:
    """Per eps, the target's three summary figures: white-box worst case, transfer (all surrogates), any attack.

    White-box and any attack are on the white-box images; transfer on the transfer slice (they are stated)."""
    out: dict[str, dict[float, dict[str, Any]]] = {"white-box": {}, "transfer": {}, "any": {}}
    for r in result["records"]:
        if r["model"] != "target" or r["norm"] != norm:
            continue
        if r["threat"] == "worst-case" and r["attack"].startswith("worst case"):
            out["white-box"][r["eps"]] = r
        elif r["threat"] == "worst-case" and r["attack"].startswith("any attack"):
            out["any"][r["eps"]] = r
    for r in _recs(result, "transfer"):
        if r["norm"] == norm and r["attack"].startswith("worst case"):
            out["transfer"][r["eps"]] = r
    return out


def render(args: argparse.Namespace, method: str, target_res: dict[str, Any], base_res: dict[str, Any],
           hp: dict[str, Any], command: str, wall_s: float, train_times: dict[str, float | None]) -> str:
    rows = [("baseline", base_res), (method, target_res)] if method != "baseline" else [("baseline", base_res)]
    epochs = target_res["models"]["target"].get("epochs")
    full = PROTOCOL_EPOCHS[args.dataset]
    ds_name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}[args.dataset]
    n_tr = target_res["n_examples"]["transfer"]
    n_wb = target_res["n_examples"]["white_box"]
    code = target_res.get("code_version") or {}
    lines = [f"### Reproduction: `{method}` on {ds_name} (PROTOCOL.md, reduced CPU budget)", ""]
    budget = (f"**Budget.** `lenet5`, {args.members} members, "
              + ("a 3,000-image training subset, 1 epoch (`--quick`: a smoke test, numbers not meaningful)"
                 if args.quick else ("the full 60k training set" if not args.train_subset else
                                     f"a seeded {args.train_subset:,}-image subset of the training set (reduced)")
                 + f", **{epochs} epochs (reduced from PROTOCOL.md's "
                                    f"{full}** "
                                    "to fit the shared 2-core CPU machine; the baseline and the surrogates have the "
                                    "same reduced budget)")
              + ", Adam lr 1e-3, weight decay 1e-4, batch 128, training seed 0 (one training seed per model). "
              f"Method hyperparameters: `{json.dumps(hp, sort_keys=True)}`. Deployed rule: "
              f"`{target_res['models']['target']['deployed_rule']}` (white-box gradients through "
              f"`{target_res['models']['target']['attacked_rule']}`, every example scored on the deployed rule). "
              f"Test images: the PROTOCOL report subset (test indices after the 1,000-image selection subset of "
              f"the `random.seed(0)` shuffle), a {n_tr}-image slice for transfer and its first {n_wb} images for "
              "white-box attacks; evaluation seed 0. Evaluation code "
              f"`{code.get('evaluation_code', '?')}` (git {code.get('git_commit') or '?'}).")
    lines += [budget, ""]

    lines += ["**Clean accuracy (%)**", "", "| model | deployed rule | clean acc, transfer slice | "
              "clean acc, white-box slice | members |", "|---|---|---|---|---|"]
    for name, res in rows:
        c = res["clean"]["target"]
        lines.append(f"| {name} | {c['deployed_rule']} | {_pct(c.get('clean_acc_transfer_slice'))} | "
                     f"{_pct(c['clean_acc'])} | {', '.join(_pct(a) for a in c['member_clean_acc'])} |")
    lines.append("")

    heads = {name: headline(res) for name, res in rows}
    eps_all = sorted({e for h in heads.values() for part in h.values() for e in part})
    lines += [f"**Summary, robust accuracy (%)**: per image the worst case over every white-box attack below "
              f"({n_wb} images), over every transfer attack and surrogate ({n_tr} images), and over both together "
              f"(\"any attack\", on the {n_wb} white-box images); a figure at eps also counts every attack at a "
              "smaller eps. ⚠ = flagged unreliable.", "",
              "| model | threat | " + " | ".join(f"ε={e:g}" for e in eps_all) + " |",
              "|---|---|" + "---|" * len(eps_all)]
    for name, h in heads.items():
        for part, title in (("white-box", "white-box, worst case"), ("transfer", "transfer, worst case"),
                            ("any", "**any attack**")):
            lines.append(f"| {name} | {title} | " + " | ".join(_cell(h[part].get(e)) for e in eps_all) + " |")
    lines.append("")

    tr_groups = list(dict.fromkeys(r.get("surrogate_group", "all") for r in _recs(target_res, "transfer", None)))
    tr = [r for r in _recs(target_res, "transfer") if not r["attack"].startswith("worst case")]
    cols = list(dict.fromkeys((r["attack"], r["eps"]) for r in tr))
    surr = "; ".join(f"{n} ({d['members']} members, {d.get('group', 'baseline')})"
                     for n, d in target_res["surrogates"].items())
    lines += [f"**Black-box transfer, robust accuracy (%)**: {n_tr} images; surrogates: {surr} (same budget, never "
              "the target's weights; same-method = the method's own configuration trained with seed 1); attacks "
              "FGSM and BIM/MIM/PGD-10 (step eps/5, MIM momentum 1.0, PGD random start with 3 seeds), each with CE "
              "and the CW margin (κ = 0.1), crafted on each surrogate's log of mean probabilities; per image the "
              "worst case over the row's surrogates, both losses and every seed. Each cell: **over all report "
              "images** / *the papers' figure, among the images the model classifies correctly clean*.", ""]
    lines.append("| model | surrogates | " + " | ".join(f"{a.split(' ')[0].upper().replace('X', '×')} ε={e:g}"
                                                  for a, e in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for name, res in rows:
        for g in tr_groups:
            by = {(r["attack"], r["eps"]): r for r in _recs(res, "transfer", g)}
            if not by:
                continue
            cells = []
            for c in cols:
                r = by.get(c)
                cells.append("–" if r is None else f"**{_pct(r['robust_acc'])}** / "
                             f"*{_pct(r['robust_acc_among_correct'])}*" + (" ⚠" if r["unreliable"] else ""))
            lines.append(f"| {name} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
    if method != "baseline":
        diffs = []
        base_by = {(r["attack"], r["eps"]): r["robust_acc"] for r in _recs(base_res, "transfer")}
        for r in tr:
            b = base_by.get((r["attack"], r["eps"]))
            if b is not None and r["robust_acc"] is not None:
                diffs.append(r["robust_acc"] - b)
        if diffs:
            higher = sum(d > 0 for d in diffs)
            lines += [f"Against the baseline, `{method}`'s transfer robust accuracy (all surrogates) is higher in "
                      f"{higher} of {len(diffs)} cells (mean difference {100 * sum(diffs) / len(diffs):+.1f} "
                      "points); the baseline's figures have no same-method surrogate of their own besides the "
                      "3-member baseline of seed 1.", ""]

    lines += [f"**White-box, robust accuracy (%)**: {n_wb} images (the convergence check on all of them), attack by "
              "attack against the deployed rule, each the per-image worst case over its losses and restarts; our "
              "iterative attacks score every iterate on the deployed rule. `worst case` is over every white-box "
              "and gradient-free row, `any attack` adds every transfer attack. Parameters: docs/evaluation.md "
              "(\"The reviewer's set\"). Over all images; ⚠ = flagged unreliable; – = not run (vote-aware "
              "losses apply only to votes).", ""]
    wb_eps = sorted({r["eps"] for _, res in rows for r in res["records"] if r["model"] == "target"
                     and r["threat"] in ("white-box", "gradient-free", "worst-case") and r["norm"] == "Linf"})
    lines.append("| model | attack | " + " | ".join(f"ε={e:g}" for e in wb_eps) + " |")
    lines.append("|---|---|" + "---|" * len(wb_eps))
    for name, res in rows:
        recs = [r for r in res["records"] if r["model"] == "target" and r["norm"] == "Linf"
                and r["threat"] in ("white-box", "gradient-free", "worst-case")]
        for attack in dict.fromkeys(r["attack"] for r in recs):
            by = {r["eps"]: r for r in recs if r["attack"] == attack}
            lines.append(f"| {name} | {attack} | " + " | ".join(_cell(by.get(e)) for e in wb_eps) + " |")
    lines.append("")

    mt_rows = []
    for name, res in rows:
        mt = res["member_transfer"].get("target")
        if mt:
            mt_rows.append(f"| {name} | {mt['eps']:g} | {_pct(mt['mean_offdiagonal_transfer_rate'])} |")
    if mt_rows:
        lines += ["**Member-to-member transferability** (PGD-10 on member i, scored on member j; mean over i ≠ j of "
                  "the share of member i's successful examples that also fool member j)", "",
                  "| model | ε | mean transfer rate (%) |", "|---|---|---|", *mt_rows, ""]

    lines += ["**Automatic flags**", ""]
    flag_lines = [f"- {name}: `{f['name']}`" + (f" ({f['attack']})" if f.get("attack") else "") + f": {f['message']}"
                  for name, res in rows for f in res["flags"]]
    lines += flag_lines or ["No flag fired."]
    for name, res in rows:
        ck = res["checks"].get("target", {})
        conv = ck.get("convergence") or []
        if isinstance(conv, dict):
            conv = [conv]
        large = ck.get("large_eps_Linf")
        checks = []
        if large:
            checks.append(f"PGD at L∞ ε={large['eps']:g} leaves {_pct(large['robust_acc'])}% (n={large['n']})")
        for c in conv:
            checks.append(f"PGD-{c['steps']} vs PGD-{2 * c['steps']} at ε={c['eps']:g}: {_pct(c['acc_k'])}% vs "
                          f"{_pct(c['acc_2k'])}% (n={c['n']})")
        checks.append(f"zero input gradients at {ck.get('zero_gradient_cw_margin', 0)}/{ck.get('n_examples', 0)} "
                      "clean images")
        lines.append(f"- {name}, checks run: " + "; ".join(checks) + ".")
    lines.append("")

    mach = target_res["machine"]
    tt = ", ".join(f"{k} {v:.0f} s" for k, v in train_times.items() if v is not None)
    lines += ["**Reproduce**", "", "```", command, "```", "",
              f"Wall time of this invocation: {wall_s / 60:.1f} min" + (f" (training: {tt})" if tt else "")
              + "; evaluation compute, summed over resumed runs: "
              + ", ".join(f"{name} {sum(res.get('timings_s', {}).values()) / 60:.0f} min" for name, res in rows)
              + f"; machine: {mach['cpus']} CPU cores ({mach['processor']}), torch {mach['torch']} with "
              f"{args.threads} thread(s), torchattacks {mach['torchattacks']}, "
              + ("a CUDA GPU." if mach["cuda"] else "no GPU (shared with other jobs; wall times are indicative)."),
              "Cached models and evaluations (baseline, surrogates, transfer examples) are reused across methods, "
              "so the wall time of a later run excludes them.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: run one reproduction and print its markdown."""
    print(run_reproduction(argv)["markdown"])
    return 0


def run_reproduction(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one reproduction (arguments as on the command line); returns what it wrote as JSON, plus its markdown."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(max(1, args.threads))
    from ensemble_core.methods import method_names
    from ensemble_core.spec import TrainSpec

    if args.method not in method_names():
        parser.error(f"unknown method {args.method!r}; expected one of {', '.join(method_names())}")
    t_start = time.perf_counter()
    root = _project_root()
    runs = Path(args.runs_dir) if args.runs_dir else root / "runs" / "reproduce"
    budget = budget_of(args)
    shared = runs / f"{args.dataset}-{_digest(budget)}"
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "budget.json").write_text(json.dumps(budget, indent=1, sort_keys=True))
    hp_in = _parse_hp(args.hp)
    try:
        tspec = TrainSpec.model_validate(train_spec(args, args.method, args.members, 0, hp_in))
    except Exception as e:  # a bad --hp: say which
        parser.error(str(e))
    hp = tspec.hyperparameters
    cmd = "python -m ensemble_core.reproduce " + " ".join(shlex.quote(a) for a in
                                                           (sys.argv[1:] if argv is None else argv))
    train_times: dict[str, float | None] = {}

    # 1. the method's target (not shared; its own lock so two identical runs do not collide)
    base_members = args.baseline_members or args.members
    base_key = f"baseline-m{base_members}"
    if args.method == "baseline" and not hp_in and base_members == args.members:
        target_dir = shared / base_key
    else:
        target_dir = shared / "methods" / f"{args.method}-m{args.members}-{_digest(hp)}"
    is_baseline = target_dir == shared / base_key  # then it is trained below, under the shared lock
    if not is_baseline:
        with file_lock(target_dir.with_suffix(".lock"), f"{args.method}'s target"):
            target_ckpt = _train(tspec.resolved(), target_dir, retrain=args.retrain)
        train_times[args.method] = _read_time(target_dir)

    # 2. shared: baseline target, surrogates, the baseline's evaluation (which crafts the transfer cache)
    cache = shared / "transfer-cache"
    with file_lock(shared / "shared.lock", "the shared baseline, surrogates and transfer examples"):
        base_ckpt = _train(train_spec(args, "baseline", base_members, 0), shared / base_key)
        surrogates = {}
        for name, k, seed in SURROGATES:
            surrogates[name] = str(_train(train_spec(args, "baseline", k, seed), shared / f"surrogate-m{k}-s{seed}"))
            train_times[f"surrogate {k}"] = _read_time(shared / f"surrogate-m{k}-s{seed}")
        train_times["baseline"] = _read_time(shared / base_key)
        base_res = _evaluate(args, base_ckpt, surrogates, shared / f"eval-{base_key}-{_eval_tag(args)}", cache)

    # 3. the same-method surrogate: the method's own configuration trained again with seed 1 (for the baseline,
    # the 3-member baseline surrogate of seed 1 already is one)
    groups = {name: "baseline" for name in surrogates}
    target_surrogates = dict(surrogates)
    if not is_baseline and not args.no_same_method:
        same_dir = target_dir.parent / f"{target_dir.name}-seed1"
        with file_lock(same_dir.with_suffix(".lock"), f"{args.method}'s same-method surrogate"):
            same = _train(TrainSpec.model_validate(train_spec(args, args.method, args.members, 1, hp_in)).resolved(),
                          same_dir)
        train_times[f"{args.method} seed 1 (same-method surrogate)"] = _read_time(same_dir)
        name = f"{args.method}-{args.members} (seed 1)"
        target_surrogates[name] = str(same)
        groups[name] = "same-method"

    # 4. the target's evaluation on the same (cached) transfer examples
    if is_baseline:
        target_res = base_res
    else:
        with file_lock(target_dir.with_suffix(".lock"), f"{args.method}'s evaluation"):
            target_res = _evaluate(args, target_ckpt, target_surrogates, target_dir / f"eval-{_eval_tag(args)}",
                                   cache, groups)

    wall = time.perf_counter() - t_start
    md = render(args, args.method, target_res, base_res, hp, cmd, wall, train_times)
    out_md = Path(args.out) if args.out else root / "docs" / "methods" / f"{args.method}-reproduction.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md + "\n")
    out_json = target_dir / f"reproduction-{_eval_tag(args)}.json"
    payload = {
        "method": args.method, "dataset": args.dataset, "command": cmd, "budget": budget, "hyperparameters": hp,
        "members": args.members, "reduced_budget_note": f"{tspec.epochs} epochs instead of PROTOCOL.md's "
                                                        f"{PROTOCOL_EPOCHS[args.dataset]}"
                                                        + (f", a {args.train_subset}-image training subset"
                                                           if args.train_subset else ""),
        "wall_time_s": wall, "train_time_s": train_times, "machine": target_res["machine"],
        "host": platform.node(), "target": target_res, "baseline": base_res,
        "code_version": target_res.get("code_version"),
        "markdown_path": str(out_md), "json_path": str(out_json)}
    out_json.write_text(json.dumps(payload, indent=1))
    _log(f"wrote {out_md} and {out_json} ({wall / 60:.1f} min)")
    return payload | {"markdown": md}


def _eval_tag(args: argparse.Namespace) -> str:
    return _digest(eval_spec(args, "") | {"same_method": not args.no_same_method}, 8)


def _read_time(d: Path) -> float | None:
    f = d / "train_time_s.txt"
    return float(f.read_text()) if f.exists() else None


if __name__ == "__main__":
    raise SystemExit(main())
