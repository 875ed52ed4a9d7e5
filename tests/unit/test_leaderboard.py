"""The leaderboard's arithmetic: rows from reproduction payloads, ranking by the per-image worst case over every
attack ("any attack"), differences, missing, failed and stale methods, and the before/now comparison page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ensemble_core import leaderboard as lb


def _rec(threat: str, attack: str, e: float, v: float, **kw: Any) -> dict[str, Any]:
    return {"model": "target", "threat": threat, "attack": attack, "eps": e, "norm": "Linf", "robust_acc": v,
            "n_examples": 200 if threat != "transfer" else 1000, "unreliable": False, **kw}


def payload(method: str, transfer: list[float], white: list[float], anyatt: list[float], clean: float = 0.99,
            flags: list[dict[str, Any]] | None = None, same_method: float | None = None) -> dict[str, Any]:
    """A reproduction payload (as ``reproduce.run_reproduction`` returns it) with the given robust accuracies."""
    eps = [0.1, 0.15, 0.2, 0.25]
    attacks = ["fgsm (ce+cw)", "pgd-10x3 (ce+cw)"]
    cells = [(a, e) for a in attacks for e in eps]
    assert len(transfer) == len(cells)
    records = [_rec("transfer", a, e, v, surrogate_group="all", robust_acc_among_correct=v / clean)
               for (a, e), v in zip(cells, transfer, strict=True)]
    records += [_rec("transfer", "worst case (transfer, Linf)", e, min(transfer), surrogate_group="all") for e in eps]
    if same_method is not None:
        records += [_rec("transfer", a, e, same_method, surrogate_group="same-method") for a, e in cells]
    records += [_rec("white-box", "pgd-50x5", e, v, unreliable=e == 0.3) for e, v in zip([0.1, 0.2, 0.3], white,
                                                                                          strict=True)]
    records += [_rec("white-box", "mora-100 (ce+dlr)", e, v / 2) for e, v in zip([0.1, 0.2, 0.3], white, strict=True)]
    records += [_rec("worst-case", "worst case (Linf, all attacks)", e, v / 2)
                for e, v in zip([0.1, 0.2, 0.3], white, strict=True)]
    records += [_rec("worst-case", "any attack (Linf)", e, v)
                for e, v in zip([0.1, 0.15, 0.2, 0.25, 0.3], anyatt, strict=True)]
    return {"method": method, "dataset": "mnist", "hyperparameters": {"alpha": 1.0},
            "command": "python -m ensemble_core.reproduce x", "train_time_s": {method: 120.0},
            "target": {"clean": {"target": {"deployed_rule": "mean_logits", "clean_acc_transfer_slice": clean,
                                            "clean_acc": clean, "member_clean_acc": [0.5] * 3,
                                            "member_clean_acc_transfer_slice": [clean] * 3}},
                       "spec": {"attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 50, "restarts": 5}]},
                       "records": records, "models": {"target": {"attacked_rule": "mean_logits"}},
                       "member_transfer": {"target": {"mean_offdiagonal_transfer_rate": 0.25}},
                       "code_version": {"evaluation_code": "abc", "git_commit": "1234"},
                       "flags": flags or [], "timings_s": {"a": 1.0, "b": 2.0}}}


def test_a_row_summarises_every_threat_and_its_reproducing_command() -> None:
    row = lb.summarise(payload("pdd", [0.8] * 4 + [0.6] * 4, [0.5, 0.2, 0.0], [0.4, 0.3, 0.1, 0.05, 0.0],
                               same_method=0.7))
    assert row["status"] == "done" and row["transfer_mean"] == 0.7  # (4 × 0.8 + 4 × 0.6) / 8, worst case excluded
    assert row["any_attack_mean"] == (0.4 + 0.3 + 0.1 + 0.05 + 0.0) / 5
    assert [w["attack"] for w in row["white_box"]] == ["pgd-50x5"] * 3 + ["mora-100 (ce+dlr)"] * 3
    assert [w["eps"] for w in row["white_box_pgd_ce"]] == [0.1, 0.2, 0.3]  # the earlier headline, kept
    assert [w["robust_acc"] for w in row["white_box_worst"]] == [0.25, 0.1, 0.0]
    assert [w["eps"] for w in row["transfer_worst"]] == [0.1, 0.15, 0.2, 0.25]
    assert abs(row["transfer_by_group"]["same-method"]["mean"] - 0.7) < 1e-12
    assert row["member_clean_acc"] == [0.99] * 3  # on the transfer slice, like the ensemble's clean accuracy
    assert row["white_box"][2]["unreliable"] and row["evaluation_time_s"] == 3.0 and row["train_time_s"] == 120.0
    assert row["command"] == "python -m ensemble_core.leaderboard --datasets mnist --methods pdd"
    assert row["code_version"]["evaluation_code"] == "abc"
    small = dict(lb.BUDGET, epochs=1)
    assert lb.summarise(payload("pdd", [0.5] * 8, [0, 0, 0], [0] * 5), small)["command"].endswith(
        "--methods pdd --epochs 1")


def test_ranking_by_any_attack_differences_and_rows_that_failed_did_not_run_or_are_stale(tmp_path: Path) -> None:
    cells = {"baseline": lb.summarise(payload("baseline", [0.5] * 8, [0.4, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0])),
             # pdd has the best transfer mean but is weaker once every attack counts: it ranks below gal
             "pdd": lb.summarise(payload("pdd", [0.7] * 8, [0.5, 0.2, 0.0], [0.3, 0.2, 0.1, 0.1, 0.0], clean=0.98)),
             "gal": lb.summarise(payload("gal", [0.6] * 8, [0.3, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1], clean=0.97)),
             "trs": {"method": "trs", "status": "failed", "error": "RuntimeError: boom"},
             "adp": {"method": "adp", "status": "done", "transfer_mean": 0.9, "transfer": [], "white_box": []}}
    for m, row in cells.items():
        p = lb._cell_path(tmp_path, "mnist", m)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(row))
    doc = lb.collect(tmp_path, ["mnist", "fashion_mnist"], ["baseline", "gal", "pdd", "trs", "dkd", "adp"],
                     lb.BUDGET)
    rows = doc["datasets"]["mnist"]["rows"]
    assert [(r["method"], r.get("rank")) for r in rows] == [("gal", 1), ("pdd", 2), ("baseline", 3), ("adp", None),
                                                             ("dkd", None), ("trs", None)]
    by = {r["method"]: r for r in rows}
    assert abs(by["pdd"]["transfer_mean_vs_baseline"] - 0.2) < 1e-12
    # ranked over the white-box eps (0.1, 0.2, 0.3) only: at 0.15 and 0.25 no white-box attack ran
    assert abs(by["gal"]["any_attack_wb_mean"] - 0.3) < 1e-12 and abs(by["pdd"]["any_attack_wb_mean"] - 0.4 / 3) < 1e-12
    assert abs(by["gal"]["any_attack_mean_vs_baseline"] - (0.9 - 0.4) / 3) < 1e-12
    assert abs(by["gal"]["clean_acc_vs_baseline"] + 0.02) < 1e-12
    assert by["dkd"]["status"] == "not run" and by["trs"]["status"] == "failed"
    assert by["adp"]["status"] == "stale"  # made by the earlier evaluation: never ranked beside the new rows
    assert all(r["status"] == "not run" for r in doc["datasets"]["fashion_mnist"]["rows"])
    assert doc["code_versions"] == [json.dumps({"evaluation_code": "abc", "git_commit": "1234"}, sort_keys=True)]
    md = lb.render(doc)
    assert "| 1 | `gal` | 97.0 | 50.0 | 30.0 | 10.0 | **30.0** |" in md
    assert "| – | trs | failed: RuntimeError: boom |" in md and "| – | dkd | not run |" in md
    assert "| – | adp | stale: made by an earlier evaluation" in md
    assert "No method has finished on this data set with the current evaluation yet." in md
    assert "`abc` (git 1234)" in md and "mora-100 (ce+dlr) ε=0.2" in md


def test_the_comparison_page_sets_the_earlier_figures_beside_the_new_ones(tmp_path: Path) -> None:
    new = {m: lb.summarise(payload(m, [0.5] * 8, [0.4, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0], same_method=0.6))
           for m in ("baseline", "pdd")}
    for m, row in new.items():
        p = lb._cell_path(tmp_path, "mnist", m)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(row))
    doc = lb.collect(tmp_path, ["mnist"], ["baseline", "pdd"], lb.BUDGET)
    old = {"generated_at": "2026-11-22T13:09:54Z", "datasets": {"mnist": {"rows": [
        {"method": "pdd", "status": "done", "rank": 7, "transfer_mean": 0.505,
         "white_box": [{"attack": "pgd-50x5", "eps": 0.2, "robust_acc": 0.18, "unreliable": False}]}]}}}
    md = lb.render_comparison(old, doc, "mnist")
    assert "| `pdd` | 7 → " in md and "| 50.5 |" in md and "| 18.0 |" in md
    assert "## Attack by attack at ε = 0.2" in md and "mora-100 (ce+dlr)" in md


def test_published_rows_are_restored_only_with_the_same_budget_and_evaluation_code(tmp_path: Path,
                                                                                   monkeypatch: Any) -> None:
    monkeypatch.setattr("ensemble_core.evaluation.codeversion.evaluation_code_fingerprint", lambda: "abc")
    rows = {m: lb.summarise(payload(m, [0.5] * 8, [0.4, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0]))
            for m in ("baseline", "pdd")}
    rows["pdd"]["code_version"] = {"evaluation_code": "older"}
    for m, row in rows.items():
        p = lb._cell_path(tmp_path / "a", "mnist", m)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(row))
    published = tmp_path / "leaderboard.json"
    published.write_text(json.dumps(lb.collect(tmp_path / "a", ["mnist"], ["baseline", "pdd"], lb.BUDGET)))
    runs = tmp_path / "b"
    assert lb.restore_cells(published, runs, ["mnist"], ["baseline", "pdd"], dict(lb.BUDGET, epochs=5)) == []
    assert lb.restore_cells(published, runs, ["mnist"], ["baseline", "pdd"], lb.BUDGET) == ["mnist/baseline"]
    cell = json.loads(lb._cell_path(runs, "mnist", "baseline").read_text())
    assert cell == rows["baseline"] | {"restored_from": "leaderboard.json"}  # the derived keys are recomputed
    assert lb.restore_cells(published, runs, ["mnist"], ["baseline"], lb.BUDGET) == []  # never over a cell


def test_a_run_of_one_data_set_keeps_the_other_data_sets_published_rows(tmp_path: Path, monkeypatch: Any) -> None:
    """A fresh checkout runs only Fashion-MNIST: the page is rewritten whole and must keep the MNIST rows."""
    monkeypatch.setattr("ensemble_core.evaluation.codeversion.evaluation_code_fingerprint", lambda: "abc")
    row = lb.summarise(payload("baseline", [0.5] * 8, [0.4, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0]))
    first = tmp_path / "first"
    lb._cell_path(first, "mnist", "baseline").parent.mkdir(parents=True)
    lb._cell_path(first, "mnist", "baseline").write_text(json.dumps(row))
    out = tmp_path / "out"
    out.mkdir()
    (out / "leaderboard.json").write_text(json.dumps(lb.collect(first, ["mnist"], ["baseline"], lb.BUDGET)))
    assert lb.main(["--datasets", "fashion_mnist", "--methods", "baseline", "--render-only",
                    "--runs-dir", str(tmp_path / "fresh"), "--out-dir", str(out)]) == 0
    doc = json.loads((out / "leaderboard.json").read_text())
    mnist = {r["method"]: r for r in doc["datasets"]["mnist"]["rows"]}
    assert mnist["baseline"]["status"] == "done" and mnist["baseline"]["any_attack_mean"] == row["any_attack_mean"]
    assert {r["method"]: r["status"] for r in doc["datasets"]["fashion_mnist"]["rows"]}["baseline"] == "not run"
