"""Plain-text rendering of job results for the terminal (``robust-ensembles results``, the demo)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join((r[i] if i < len(r) else "").ljust(widths[i]) for i in range(len(columns))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_train(results: dict[str, Any]) -> str:
    metrics = results.get("metrics") or {}
    inner = results.get("results") or {}
    out = []
    rows = [[k, _num(v)] for k, v in metrics.items() if not isinstance(v, dict | list)]
    if rows:
        out.append(text_table(["metric", "value"], rows))
    subset = inner.get("test_subset")
    if isinstance(subset, dict):
        out.append(f"test subset: {subset.get('split')} split, n = {subset.get('n')} ({subset.get('order', '')})")
    history = inner.get("history") or []
    if history:
        keys = [k for k in ("train_loss", "val_clean_acc", "sel_clean_acc", "epoch_time_s") if k in history[0]]
        hrows = [[h.get("global_epoch", i + 1)] + [_num(h.get(k, "")) for k in keys] for i, h in enumerate(history)]
        out.append("per epoch:\n" + text_table(["epoch", *keys], hrows))
    startup = inner.get("startup_s")
    if isinstance(startup, dict) and startup:
        parts = ", ".join(f"{k} {_num(v)}" for k, v in startup.items() if k != "total")
        out.append(f"start-up to the first step: {_num(startup.get('total', ''))} s ({parts})")
    method = inner.get("method_results")
    if method:
        out.append("method results: " + json.dumps(method, default=str))
    return "\n\n".join(out) if out else json.dumps(results, indent=2, default=str)


def format_evaluate(results: dict[str, Any]) -> str:
    out = []
    for t in results.get("tables") or []:
        block = [t.get("title", t.get("name", ""))]
        block.append(text_table(t.get("columns", []), t.get("rows", [])))
        if t.get("notes"):
            block.append(t["notes"])
        out.append("\n".join(block))
    if results.get("unreliable"):
        out.append("Some results are flagged unreliable (see the flags table).")
    return "\n\n".join(out) if out else json.dumps(results, indent=2, default=str)


def format_results(job: dict[str, Any], results: dict[str, Any]) -> str:
    head = f"{job['kind']} job {job['id']} ({job['status']})"
    if job["kind"] == "train":
        spec = job.get("spec", {})
        head += (f": {spec.get('method')} ensemble of {spec.get('members')} x {spec.get('architecture')} on "
                 f"{spec.get('dataset')}, {spec.get('epochs')} epochs, {spec.get('workers')} Ray Train worker(s)")
        return head + "\n\n" + format_train(results)
    if job["kind"] == "evaluate":
        return head + "\n\n" + format_evaluate(results)
    return head + "\n\n" + json.dumps(results, indent=2, default=str)
