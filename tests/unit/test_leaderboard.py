"""The leaderboard's arithmetic: rows from reproduction payloads, ranking, differences, missing methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ensemble_core import leaderboard as lb


def payload(method: str, transfer: list[float], white: list[float], clean: float = 0.99,
            flags: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A reproduction payload (as ``reproduce.run_reproduction`` returns it) with the given robust accuracies."""
    eps = [0.1, 0.15, 0.2, 0.25]
    attacks = ["fgsm (ce+cw)", "pgd-10 (ce+cw)"]
    cells = [(a, e) for a in attacks for e in eps]
    assert len(transfer) == len(cells)
    records = [{"model": "target", "threat": "transfer", "attack": a, "eps": e, "norm": "Linf", "robust_acc": v,
                "robust_acc_among_correct": v / clean, "unreliable": False}
               for (a, e), v in zip(cells, transfer, strict=True)]
    records += [{"model": "target", "threat": "white-box", "attack": "pgd-50x5", "eps": e, "norm": "Linf",
                 "robust_acc": v, "unreliable": e == 0.3} for e, v in zip([0.1, 0.2, 0.3], white, strict=True)]
    records.append({"model": "target", "threat": "worst-case", "attack": "worst case (Linf, all attacks)",
                    "eps": 0.1, "norm": "Linf", "robust_acc": 0.0, "unreliable": False})  # not a white-box row
    return {"method": method, "dataset": "mnist", "hyperparameters": {"alpha": 1.0},
            "command": "python -m ensemble_core.reproduce x", "train_time_s": {method: 120.0},
            "target": {"clean": {"target": {"deployed_rule": "mean_logits", "clean_acc_transfer_slice": clean,
                                            "clean_acc": clean, "member_clean_acc": [clean] * 3}},
                       "records": records, "models": {"target": {"attacked_rule": "mean_logits"}},
                       "member_transfer": {"target": {"mean_offdiagonal_transfer_rate": 0.25}},
                       "flags": flags or [], "timings_s": {"a": 1.0, "b": 2.0}}}


def test_a_row_summarises_transfer_white_box_and_its_reproducing_command() -> None:
    row = lb.summarise(payload("pdd", [0.8] * 4 + [0.6] * 4, [0.5, 0.2, 0.0]))
    assert row["status"] == "done" and row["transfer_mean"] == 0.7  # (4 × 0.8 + 4 × 0.6) / 8
    assert [w["eps"] for w in row["white_box"]] == [0.1, 0.2, 0.3]  # worst-case rows are not white-box rows
    assert row["white_box"][2]["unreliable"] and row["evaluation_time_s"] == 3.0 and row["train_time_s"] == 120.0
    assert row["command"] == "python -m ensemble_core.leaderboard --datasets mnist --methods pdd"
    small = dict(lb.BUDGET, epochs=1)
    assert lb.summarise(payload("pdd", [0.5] * 8, [0, 0, 0]), small)["command"].endswith("--methods pdd --epochs 1")


def test_ranking_differences_and_rows_that_failed_or_did_not_run(tmp_path: Path) -> None:
    cells = {"baseline": lb.summarise(payload("baseline", [0.5] * 8, [0.4, 0.1, 0.0], clean=0.99)),
             "pdd": lb.summarise(payload("pdd", [0.7] * 8, [0.5, 0.2, 0.0], clean=0.98)),
             "gal": lb.summarise(payload("gal", [0.6] * 8, [0.3, 0.0, 0.0], clean=0.97)),
             "trs": {"method": "trs", "status": "failed", "error": "RuntimeError: boom"}}
    for m, row in cells.items():
        p = lb._cell_path(tmp_path, "mnist", m)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(row))
    doc = lb.collect(tmp_path, ["mnist", "fashion_mnist"], ["baseline", "gal", "pdd", "trs", "dkd"], lb.BUDGET)
    rows = doc["datasets"]["mnist"]["rows"]
    assert [(r["method"], r.get("rank")) for r in rows] == [("pdd", 1), ("gal", 2), ("baseline", 3), ("dkd", None),
                                                             ("trs", None)]
    by = {r["method"]: r for r in rows}
    assert abs(by["pdd"]["transfer_mean_vs_baseline"] - 0.2) < 1e-12
    assert abs(by["gal"]["clean_acc_vs_baseline"] + 0.02) < 1e-12
    assert by["dkd"]["status"] == "not run" and by["trs"]["status"] == "failed"
    assert all(r["status"] == "not run" for r in doc["datasets"]["fashion_mnist"]["rows"])
    md = lb.render(doc)
    assert ("| 1 | `pdd` | 98.0 | 70.0 | 70.0 | 70.0 | 70.0 | **70.0** | +20.0 | 50.0 | 20.0 | 0.0 ⚠ | 25.0 | 2.0 |"
            in md)
    assert "| – | trs | failed: RuntimeError: boom |" in md and "| – | dkd | not run |" in md
    assert "No method has finished on this data set yet." in md
