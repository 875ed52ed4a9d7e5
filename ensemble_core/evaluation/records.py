"""Result records (shaped like RobustBench's), tables, flags and artifacts from the per-example state.

One record per (model, attack, eps): ``clean_acc``, ``robust_acc``, ``eps``, ``norm`` / ``threat_model``,
the attack with every parameter, ``n_examples``, ``seed``, ``flags`` and ``unreliable`` (RobustBench's
field). Robust accuracy is over **all** examples of the record's slice (an example counts as robust only
if it is correct clean and on every adversarial copy); the papers' figure, conditional on the clean
example being classified correctly, is ``robust_acc_among_correct`` and is labelled wherever it is shown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ensemble_core.evaluation.attacks import (
    GRADIENT_FREE,
    MINIMAL_PERTURBATION,
    TORCHATTACKS_VERSION,
    attack_label,
    attack_losses,
    attack_norm,
    resolved_params,
)
from ensemble_core.evaluation.codeversion import code_version
from ensemble_core.evaluation.flags import (
    Flag,
    apply_flags,
    check_convergence,
    check_invalid,
    check_large_eps,
    check_member_collapse,
    check_monotone,
    check_probability_outputs,
    check_randomized,
    check_surrogate_is_target,
    check_unit_test,
    check_weaker_attack_beats_stronger,
    check_zero_gradients,
)
from ensemble_core.evaluation.runner import EvalModel, EvalPlan
from ensemble_core.evaluation.state import EvalState
from ensemble_core.evaluation.state import column as _col

RESULTS_FORMAT = "robust-ensembles/eval-results-v1"
AMONG_CORRECT_LABEL = "papers' figure: robust accuracy among the examples the model classifies correctly clean"


def any_attack_label(norm: str) -> str:
    """The label of the per-image worst case over every attack, transfer included."""
    return f"any attack ({norm})"


def transfer_worst_label(norm: str) -> str:
    """The label of the per-image worst case over every transfer attack."""
    return f"worst case (transfer, {norm})"


def conv_label(label: str, steps: int) -> str:
    """The label of the convergence check's rows: the reported attack with twice the steps."""
    return f"{label} @{2 * steps} steps (convergence check)"


def _bools(state: EvalState, key: str) -> torch.Tensor:
    if key not in state.columns:
        raise KeyError(f"the evaluation state has no column {key!r} (incomplete evaluation)")
    col = state.columns[key]
    if b"?" in col:
        raise ValueError(f"column {key!r} is incomplete ({col.count(b'?')} examples not computed)")
    return torch.tensor([c == 49 for c in col], dtype=torch.bool)


def _rows(state: EvalState, key: str) -> torch.Tensor:
    return torch.tensor([c != 45 for c in state.columns[key]], dtype=torch.bool)


def _acc(mask: torch.Tensor, rows: torch.Tensor) -> float:
    n = int(rows.sum())
    return float((mask & rows).sum()) / n if n else float("nan")


def _record(plan: EvalPlan, m: EvalModel, threat: str, attack: str, params: dict[str, Any], norm: str, eps: float,
            rows: torch.Tensor, clean: torch.Tensor, robust: torch.Tensor, **extra: Any) -> dict[str, Any]:
    n = int(rows.sum())
    nc = int((clean & rows).sum())
    nr = int((robust & clean & rows).sum())
    rec = {"model": m.name, "model_ref": m.ref, "dataset": plan.dataset, "split": plan.spec.split,
           "seed": plan.spec.seed, "threat": threat, "attack": attack, "attack_params": params, "norm": norm,
           "threat_model": norm, "eps": eps, "n_examples": n, "clean_acc": nc / n if n else None,
           "robust_acc": nr / n if n else None, "n_clean_correct": nc, "n_robust": nr,
           "deployed_rule": m.deployed, "attacked_rule": m.attacked, "flags": [], "unreliable": False}
    if plan.spec.among_correct:
        rec["robust_acc_among_correct"] = nr / nc if nc else None
        rec["robust_acc_among_correct_label"] = AMONG_CORRECT_LABEL
    rec.update(extra)
    return rec


def summarize(plan: EvalPlan, state: EvalState, wall_time_s: float | None = None) -> dict[str, Any]:
    """Records, flags, tables and the report from a complete (possibly merged) state."""
    if (state.lo, state.hi) != (0, plan.n):
        raise ValueError(f"the state covers examples [{state.lo}, {state.hi}), not the whole evaluation [0, {plan.n})")
    tol = plan.spec.checks.tolerance
    wb_rows, tr_rows, check_rows = plan.in_wb, plan.in_tr, plan.in_check
    records: list[dict[str, Any]] = []
    flags: list[Flag] = []
    clean_info: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    member_transfer: dict[str, Any] = {}
    not_applicable: dict[str, list[str]] = {}
    flags_info: list[dict[str, Any]] = []
    labels = [attack_label(a) for a in plan.wb]
    tr_labels = [attack_label(a) for a in plan.tr]
    for m in plan.models:
        clean = _bools(state, _col(m.name, "clean"))
        k = len(m.ensemble)
        clean_info[m.name] = {
            "clean_acc": _acc(clean, wb_rows), "n_examples": int(wb_rows.sum()),
            "member_clean_acc": [_acc(_bools(state, _col(m.name, "member_clean", i)), wb_rows) for i in range(k)],
            "deployed_rule": m.deployed, "attacked_rule": m.attacked}
        if plan.tr:
            clean_info[m.name]["clean_acc_transfer_slice"] = _acc(clean, tr_rows)
            clean_info[m.name]["n_examples_transfer_slice"] = int(tr_rows.sum())
            clean_info[m.name]["member_clean_acc_transfer_slice"] = [
                _acc(_bools(state, _col(m.name, "member_clean", i)), tr_rows) for i in range(k)]

        # ---- model-level checks at the clean points (the check rows)
        n_all = int(_rows(state, _col(m.name, "randomized")).sum())
        n_random = int(_bools(state, _col(m.name, "randomized")).sum())
        n_probs = int(_bools(state, _col(m.name, "prob_outputs")).sum())
        n_logp = int(_bools(state, _col(m.name, "log_prob_outputs")).sum())
        n_zero_ce = int(_bools(state, _col(m.name, "zero_grad", "ce")).sum())
        n_zero_cw = int(_bools(state, _col(m.name, "zero_grad", "cw")).sum())
        checks[m.name] = {"randomized_examples": n_random, "probability_output_examples": n_probs,
                          "log_probability_output_examples": n_logp, "zero_gradient_ce": n_zero_ce,
                          "zero_gradient_cw_margin": n_zero_cw, "n_examples": n_all}
        flags += check_randomized(m.name, n_random, n_all)
        flags += check_probability_outputs(m.name, m.attacked, n_probs, n_all)
        flags += check_zero_gradients(m.name, n_zero_cw, n_zero_ce, n_all)
        flags += check_member_collapse(m.name, clean_info[m.name]["member_clean_acc"], plan.spec.checks.collapse_gap,
                                       clean_info[m.name]["n_examples"])

        # ---- white-box and gradient-free records
        robust_by: dict[str, list[tuple[float, torch.Tensor, str]]] = {}  # norm -> (eps, robust, threat)
        acc_by_attack: dict[int, dict[float, float]] = {}
        for i, a in enumerate(plan.wb):
            norm = attack_norm(a)
            threat = "gradient-free" if a.name in GRADIENT_FREE else "white-box"
            ran = attack_losses(a, m.ensemble.rule)
            if not ran:  # e.g. an entry with only vote-aware losses, on a rule that is not a vote: nothing ran
                not_applicable.setdefault(m.name, []).append(labels[i])
                continue
            acc_by_attack[i] = {}
            if a.name in MINIMAL_PERTURBATION:
                dist = state.floats.get(_col(m.name, "wb", i, "dist"))
                if dist is None:
                    raise ValueError(f"the evaluation state has no CW distances for {labels[i]}")
                found = [d for d in dist if d is not None]
                for e in sorted(a.eps):
                    robust = torch.tensor([d is None or d > e for d in dist], dtype=torch.bool) & clean & wb_rows
                    params = resolved_params(a, e)
                    params["median_l2_of_found"] = float(torch.tensor(found).median()) if found else None
                    records.append(_record(plan, m, threat, labels[i], params, norm, e, wb_rows, clean, robust))
                    robust_by.setdefault(norm, []).append((e, robust, threat))
                    acc_by_attack[i][e] = _acc(robust, wb_rows)
            else:
                for e in a.eps:
                    robust = _bools(state, _col(m.name, "wb", i, e)) & clean
                    params = resolved_params(a, e)
                    if ran != params["losses"]:
                        params["skipped_losses"] = [x for x in params["losses"] if x not in ran]
                        params["losses"] = ran
                    records.append(_record(plan, m, threat, labels[i], params, norm, e, wb_rows, clean, robust))
                    robust_by.setdefault(norm, []).append((e, robust, threat))
                    acc_by_attack[i][e] = _acc(robust, wb_rows)
            flags += check_monotone(m.name, labels[i], acc_by_attack[i], _acc(clean, wb_rows), tol, threat, norm)
            flags += check_invalid(m.name, labels[i], state.counters.get(_col(m.name, "invalid", "wb", i), 0),
                                   (threat, "worst-case"))

        # ---- the convergence check (the first PGD attack with 2k steps) at every eps: a white-box attack of its
        # own on the check rows, merged into the worst case; its flag compares it with the reported k steps
        if plan.convergence is not None:
            i, eps_list = plan.convergence
            a = plan.wb[i]
            conv_checks = []
            for e in eps_list:
                key = _col(m.name, "conv", "2k", e)
                rows = _rows(state, key)
                robust2k = _bools(state, key) & clean
                acc_k = _acc(_bools(state, _col(m.name, "wb", i, e)) & clean, rows)  # the reported result there
                acc_2k = _acc(robust2k, rows)
                conv_checks.append({"attack": labels[i], "eps": e, "steps": a.steps, "acc_k": acc_k,
                                    "acc_2k": acc_2k, "n": int(rows.sum())})
                flags += check_convergence(m.name, labels[i], e, a.steps, acc_k, acc_2k, int(rows.sum()), tol)
                params = resolved_params(a.model_copy(update={"steps": 2 * a.steps}), e)
                params["note"] = (f"the convergence check: {labels[i]} repeated with {2 * a.steps} steps (same "
                                  f"restarts, losses and random starts) on the first {int(rows.sum())} white-box "
                                  "images; merged into the worst case")
                records.append(_record(plan, m, "white-box", conv_label(labels[i], a.steps), params, attack_norm(a),
                                       e, rows & wb_rows, clean, robust2k))
                # outside the check rows it says nothing: neutral in the worst case
                robust_by.setdefault(attack_norm(a), []).append((e, robust2k | ~rows, "white-box"))
            checks[m.name]["convergence"] = conv_checks

        # ---- transfer records: per surrogate group (baseline ensembles; the method's own ensemble trained with
        # other seeds) and over every surrogate; each the worst case over its surrogates, losses and restarts
        tr_by: dict[str, list[tuple[float, torch.Tensor]]] = {}
        tr_by_group: dict[str, dict[str, list[tuple[float, torch.Tensor]]]] = {}
        groups = list(dict.fromkeys(s.group for s in plan.surrogates))
        group_sets = [("all", plan.surrogates)] + ([(g, [s for s in plan.surrogates if s.group == g])
                                                    for g in groups] if len(groups) > 1 else [])
        for i, a in enumerate(plan.tr):
            norm = attack_norm(a)
            for e in a.eps:
                per_component = {(s.name, loss): _bools(state, _col(m.name, "tr", i, e, s.name, loss)) & clean
                                 for s in plan.surrogates for loss in attack_losses(a)}
                for group, members in group_sets:
                    robust = clean.clone()
                    components = []
                    for s in members:
                        for loss in attack_losses(a):
                            r_c = per_component[(s.name, loss)]
                            robust &= r_c
                            components.append({"surrogate": s.name, "group": s.group, "loss": loss,
                                               "robust_acc": _acc(r_c, tr_rows)})
                    params = resolved_params(a, e)
                    params["kappa"] = a.kappa
                    params["crafted_on"] = "each surrogate's log of mean probabilities (transfer_view)"
                    records.append(_record(plan, m, "transfer", tr_labels[i], params, norm, e, tr_rows, clean, robust,
                                           surrogate_group=group, surrogates=[s.describe() for s in members],
                                           components=components))
                    tr_by_group.setdefault(group, {}).setdefault(norm, []).append((e, robust))
                    if group == "all":
                        tr_by.setdefault(norm, []).append((e, robust))
        # per image, the worst case over every transfer attack (and eps' <= eps), over all surrogates and per group
        for group, by_norm in tr_by_group.items():
            members = next(ms for g, ms in group_sets if g == group)
            for norm, items in by_norm.items():
                for e in sorted({e for e, _ in items}):
                    robust = clean & tr_rows
                    for e2, r in items:
                        if e2 <= e + 1e-12:
                            robust = robust & r
                    params = {"name": "worst-case", "over": [tr_labels[i] for i, a in enumerate(plan.tr)
                                                             if attack_norm(a) == norm],
                              "rule": "per example: robust only if robust to every transfer attack, surrogate (of "
                                      "the group), loss and seed at every eps' <= eps"}
                    records.append(_record(plan, m, "transfer", transfer_worst_label(norm), params, norm, e, tr_rows,
                                           clean, robust, surrogate_group=group,
                                           surrogates=[s.describe() for s in members]))
        for s in plan.surrogates:
            if s.fingerprint == m.fingerprint:
                flags += check_surrogate_is_target(m.name, s.name)

        # ---- per-example worst case over all white-box (+ gradient-free) attacks, per norm
        wc_acc: dict[str, dict[float, float]] = {}
        for norm, items in robust_by.items():
            eps_all = sorted({e for e, _, _ in items})
            wc_acc[norm] = {}
            for e in eps_all:
                robust = clean & wb_rows
                used = set()
                for e2, r, _ in items:
                    if e2 <= e + 1e-12:
                        robust = robust & r
                        used.add(e2)
                params = {"name": "worst-case", "over": [labels[i] for i, a in enumerate(plan.wb)
                                                         if attack_norm(a) == norm],
                          "rule": "per example: robust only if robust to every attack, restart and loss at every "
                                  "eps' <= eps"}
                records.append(_record(plan, m, "worst-case", f"worst case ({norm}, all attacks)", params, norm, e,
                                       wb_rows, clean, robust))
                wc_acc[norm][e] = _acc(robust, wb_rows)
            if norm in tr_by:
                shared = wb_rows & tr_rows
                for e in sorted(set(eps_all) | {e2 for e2, _ in tr_by[norm]}):
                    robust = clean & shared
                    for e2, r, _ in items:
                        if e2 <= e + 1e-12:
                            robust = robust & r
                    for e2, r in tr_by[norm]:
                        if e2 <= e + 1e-12:
                            robust = robust & r
                    params = {"name": "any attack", "over": "every white-box, gradient-free and transfer attack "
                                                            "(every surrogate)",
                              "rule": "per example: robust only if robust to every attack at every eps' <= eps; "
                                      "on the white-box images (they are inside the transfer slice)"}
                    records.append(_record(plan, m, "worst-case", any_attack_label(norm), params, norm, e, shared,
                                           clean, robust))

        # ---- comparisons between attack families
        grad_wc: dict[str, dict[float, float]] = {}
        for norm, items in robust_by.items():
            grad_items = [(e, r) for e, r, t in items if t == "white-box"]
            grad_wc[norm] = {}
            for e in sorted({e for e, _ in grad_items}):
                robust = clean & wb_rows
                for e2, r in grad_items:
                    if e2 <= e + 1e-12:
                        robust = robust & r
                grad_wc[norm][e] = _acc(robust, wb_rows)
        for i, a in enumerate(plan.wb):
            norm = attack_norm(a)
            if i not in acc_by_attack:  # not run on this model (no applicable loss)
                continue
            if a.name in GRADIENT_FREE and grad_wc.get(norm):
                flags += check_weaker_attack_beats_stronger(
                    m.name, "gradient_free_beats_white_box", acc_by_attack[i], grad_wc[norm], tol,
                    f"the gradient-free {labels[i]}")
            if a.name == "fgsm":
                for j, b in enumerate(plan.wb):
                    if b.name in ("bim", "mim", "pgd", "mora") and j in acc_by_attack:
                        flags += check_weaker_attack_beats_stronger(
                            m.name, "single_step_beats_iterative", acc_by_attack[i],
                            {e: v for e, v in acc_by_attack[j].items() if e in acc_by_attack[i]}, tol,
                            f"the single-step {labels[i]}")
        for norm, items in tr_by.items():
            if not grad_wc.get(norm):
                continue
            shared = wb_rows & tr_rows
            tr_acc = {}
            for e in sorted({e for e, _ in items}):
                robust = clean & shared
                for e2, r in items:
                    if abs(e2 - e) < 1e-12:
                        robust = robust & r
                tr_acc[e] = _acc(robust, shared)
            wb_shared = {}
            for e in grad_wc[norm]:
                robust = clean & shared
                for e2, r, t in robust_by[norm]:
                    if t == "white-box" and e2 <= e + 1e-12:
                        robust = robust & r
                wb_shared[e] = _acc(robust, shared)
            flags += check_weaker_attack_beats_stronger(m.name, "transfer_beats_white_box", tr_acc, wb_shared, tol,
                                                        "transfer from the surrogate(s)")

        # ---- large-eps and convergence checks
        for norm, e in plan.large_eps.items():
            key = _col(m.name, "large", norm)
            rows = _rows(state, key)
            robust = _bools(state, key) & clean
            n = int(rows.sum())
            ys = plan.labels[rows].tolist()
            share = max(Counter(ys).values()) / n if n else 0.0
            acc = _acc(robust, rows)
            checks[m.name][f"large_eps_{norm}"] = {"eps": e, "robust_acc": acc, "n": n, "majority_share": share,
                                                  "attack": f"pgd-{plan.spec.checks.large_eps_steps} (ce+cw)"}
            flags += check_large_eps(m.name, norm, e, acc, n, share, tol)
            flags += check_invalid(m.name, None, state.counters.get(_col(m.name, "invalid", "large"), 0),
                                   ("white-box", "worst-case"))
        for counter in ("mt",):
            flags += check_invalid(m.name, None, state.counters.get(_col(m.name, "invalid", counter), 0), ())

        # ---- member-to-member transferability
        if plan.member_eps is not None and plan.spec.member_transfer is not None and k > 1:
            member_clean = [_bools(state, _col(m.name, "member_clean", i)) for i in range(k)]
            acc = [[_acc(_bools(state, _col(m.name, "mt", i, j)), wb_rows) for j in range(k)] for i in range(k)]
            rate: list[list[float | None]] = []
            for i in range(k):
                fooled_i = ~_bools(state, _col(m.name, "mt", i, i)) & member_clean[i] & wb_rows
                row: list[float | None] = []
                for j in range(k):
                    base = fooled_i & member_clean[j]
                    nb = int(base.sum())
                    row.append(float((~_bools(state, _col(m.name, "mt", i, j)) & base).sum()) / nb if nb else None)
                rate.append(row)
            off = [rate[i][j] for i in range(k) for j in range(k) if i != j and rate[i][j] is not None]
            member_transfer[m.name] = {
                "eps": plan.member_eps, "norm": "Linf",
                "attack": f"pgd-{plan.spec.member_transfer.steps} (ce) on member i",
                "alpha": plan.member_alpha, "accuracy": acc, "transfer_rate": rate,
                "mean_offdiagonal_transfer_rate": sum(off) / len(off) if off else None,
                "accuracy_label": "accuracy[i][j]: member j's accuracy on member i's adversarial examples",
                "transfer_rate_label": "transfer_rate[i][j]: share of member i's successful adversarial examples "
                                       "(on images both members classify correctly clean) that also fool member j"}

    for name, entries in not_applicable.items():
        flags_info.append({"model": name, "not_applicable": entries,
                           "message": "these attack entries have only losses that do not apply to the model's "
                                      "deployed rule (vote-aware losses on a rule that is not a vote); no record"})
    unit_tests = []
    for kind, attacks, names, threats in (("wb", plan.wb, labels, ("white-box", "gradient-free", "worst-case")),
                                         ("tr", plan.tr, tr_labels, ("transfer",))):
        for i, a in enumerate(attacks):
            for e in a.eps:
                key = _col("unit_test", kind, i, float(e))
                if state.counters.get(key + "|skipped"):
                    unit_tests.append({"attack": names[i], "eps": e, "skipped": "eps too large for a witness"})
                    continue
                n, missed = state.counters.get(key + "|n", 0), state.counters.get(key + "|missed", 0)
                unit_tests.append({"attack": names[i], "threat": kind, "eps": e, "n": n, "missed": missed})
                for m in plan.models:
                    flags += check_unit_test(m.name, names[i], e, missed, n, threats)
    # A surrogate's problems concern the transfer records of the targets it attacked (and their "any attack"
    # rows), not only the surrogate's name.
    for s in plan.surrogates:
        for i in range(len(plan.tr)):
            count = state.counters.get(_col(s.name, "invalid", "tr", i), 0)
            for m in plan.models:
                flags += [dataclasses.replace(f, message=f"surrogate {s.name!r}: {f.message}",
                                              details={**f.details, "surrogate": s.name})
                          for f in check_invalid(m.name, tr_labels[i], count, ("transfer",))]
                if count:
                    flags += [dataclasses.replace(f, attack=any_attack_label(attack_norm(plan.tr[i])),
                                                  message=f"surrogate {s.name!r}: {f.message}",
                                                  threats=("worst-case",))
                              for f in check_invalid(m.name, None, count, ("worst-case",))]
    apply_flags(records, flags)
    result: dict[str, Any] = {
        "format": RESULTS_FORMAT, "spec": plan.spec.resolved(), "dataset": plan.dataset, "split": plan.spec.split,
        "seed": plan.spec.seed,
        "n_examples": {"white_box": int(wb_rows.sum()), "transfer": int(tr_rows.sum()),
                       "checks": int(check_rows.sum())},
        "test_indices": {"first": plan.indices[:10], "count": plan.n},
        "models": {m.name: m.describe() for m in plan.models},
        "surrogates": {s.name: s.describe() for s in plan.surrogates},
        "clean": clean_info, "records": records, "flags": [f.to_dict() for f in flags],
        "unreliable": any(r["unreliable"] for r in records), "checks": checks, "member_transfer": member_transfer,
        "attack_unit_tests": unit_tests, "notes": flags_info, "code_version": code_version(),
        "timings_s": {k: round(v, 3) for k, v in state.timings.items()}, "wall_time_s": wall_time_s,
        "machine": machine_info(), "artifacts": []}
    result = _finite(result)
    result["tables"] = build_tables(result)
    result["markdown"] = render_markdown(result)
    return result


def _finite(o: Any) -> Any:
    """NaN / inf (an empty slice) become ``None`` so the results are valid JSON."""
    if isinstance(o, float):
        return o if o == o and abs(o) != float("inf") else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchattacks": TORCHATTACKS_VERSION, "cuda": torch.cuda.is_available()}


# ------------------------------------------------------------------------------------------ tables


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cell(r: dict[str, Any], both: bool) -> str:
    s = _pct(r["robust_acc"])
    if both and r.get("robust_acc_among_correct") is not None:
        s += f" / {_pct(r['robust_acc_among_correct'])}"
    return s + (" ⚠" if r["unreliable"] else "")


def _table(name: str, title: str, columns: list[str], rows: list[list[str]], notes: str = "") -> dict[str, Any]:
    md = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        md += ["", notes]
    return {"name": name, "title": title, "columns": columns, "rows": rows, "notes": notes, "markdown": "\n".join(md)}


def build_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Clean accuracy, white-box (per norm), transfer, member transferability and flags tables."""
    recs = result["records"]
    models = list(result["models"])
    tables = []
    rows = []
    for name in models:
        c = result["clean"][name]
        rows.append([name, result["models"][name].get("method") or "–", _pct(c["clean_acc"]), str(c["n_examples"]),
                     ", ".join(_pct(a) for a in c["member_clean_acc"]), c["deployed_rule"], c["attacked_rule"]])
    tables.append(_table("clean", "Clean accuracy (%)",
                         ["model", "method", "clean acc", "n", "members", "deployed rule", "attacked rule"], rows))
    for norm in ("Linf", "L2"):
        wb = [r for r in recs if r["norm"] == norm and r["threat"] in ("white-box", "gradient-free", "worst-case")]
        if not wb:
            continue
        eps = sorted({r["eps"] for r in wb})
        attacks = list(dict.fromkeys(r["attack"] for r in wb))
        rows = []
        for a in attacks:
            for name in models:
                by = {r["eps"]: r for r in wb if r["attack"] == a and r["model"] == name}
                if by:
                    n_rows = {r["n_examples"] for r in by.values()}
                    rows.append([a, name, "/".join(str(v) for v in sorted(n_rows))]
                                + [_cell(by[e], False) if e in by else "" for e in eps])
        tables.append(_table(f"white_box_{norm}", f"White-box robust accuracy (%), {norm}, seed {result['seed']}, "
                             "attacks on the deployed rule (its differentiable view where it is not differentiable; "
                             "every iterate of our iterative attacks scored on the rule)",
                             ["attack", "model", "n"] + [f"eps {e:g}" for e in eps], rows,
                             "Robust accuracy over all examples (wrong clean counts as not robust); ⚠ = flagged, "
                             "unreliable. 'any attack' is the per-image worst case over every white-box, "
                             "gradient-free and transfer attack at every eps' <= eps."))
    tr = [r for r in recs if r["threat"] == "transfer"]
    if tr:
        cols = list(dict.fromkeys((r["attack"], r["eps"]) for r in tr))
        rows = []
        groups = list(dict.fromkeys(r.get("surrogate_group", "all") for r in tr))
        for name in models:
            for g in groups:
                by = {(r["attack"], r["eps"]): r for r in tr if r["model"] == name
                      and r.get("surrogate_group", "all") == g}
                if by:
                    rows.append([name, g] + [_cell(by[c], True) if c in by else "" for c in cols])
        n = tr[0]["n_examples"]
        surr = ", ".join(f"{s} ({d['members']} members, {d.get('group', 'baseline')})"
                         for s, d in result["surrogates"].items())
        tables.append(_table("transfer", f"Black-box transfer robust accuracy (%), {n} examples, seed {result['seed']},"
                             f" surrogates: {surr}", ["model", "surrogates"] + [f"{a} eps {e:g}" for a, e in cols],
                             rows,
                             "Each cell: robust accuracy over all examples / the papers' figure, among the examples "
                             "the model classifies correctly clean. Per example the worst case over the row's "
                             "surrogates (all, or one group), both losses and every restart; crafted on each "
                             "surrogate's log of mean probabilities."))
    for name, mt in result["member_transfer"].items():
        k = len(mt["accuracy"])
        rows = [[f"member {i}"] + [_pct(mt["accuracy"][i][j]) for j in range(k)] for i in range(k)]
        tables.append(_table(f"member_transfer_{name}", f"{name}: member-to-member transfer, accuracy (%) of member j "
                             f"(columns) on PGD examples crafted on member i (rows), L∞ eps {mt['eps']:g}",
                             ["crafted on"] + [f"member {j}" for j in range(k)], rows,
                             f"Mean off-diagonal transfer rate: {_pct(mt['mean_offdiagonal_transfer_rate'])}%."))
    rows = [[f["model"], f["name"], f["attack"] or "all", f["message"]] for f in result["flags"]]
    tables.append(_table("flags", "Automatic flags", ["model", "flag", "attack", "message"],
                         rows or [["–", "none", "–", "no check fired"]]))
    return tables


def render_markdown(result: dict[str, Any]) -> str:
    head = [f"Evaluation on {result['dataset']} ({result['split']} split, seed {result['seed']}): "
            f"{result['n_examples']['white_box']} examples for white-box attacks"
            + (f", {result['n_examples']['transfer']} for transfer" if result['n_examples']['transfer'] else "") + "."]
    if result["unreliable"]:
        head.append("**Some results are flagged unreliable** (see the flags table).")
    return "\n\n".join(head + [t["markdown"] for t in result["tables"]])


# --------------------------------------------------------------------------------------- artifacts


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_artifacts(result: dict[str, Any], out_dir: str | Path, *, plots: bool = True,
                    extra: list[str] | None = None) -> dict[str, Any]:
    """Write the PNG plots, ``report.md`` and ``results.json`` into ``out_dir``; lists them (and ``extra``
    files already there) in ``result["artifacts"]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    if plots:
        from ensemble_core.evaluation.plots import write_plots

        names += write_plots(result, out)
    _atomic_write_text(out / "report.md", result["markdown"] + "\n")
    names.append("report.md")
    result["artifacts"] = names + list(extra or []) + ["results.json"]
    _atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, float):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
