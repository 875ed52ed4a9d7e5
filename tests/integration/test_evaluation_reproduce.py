"""``reproduce`` end to end on real MNIST at the ``--quick`` budget: the baseline and a method, the second
run reusing the shared baseline, surrogates and transfer examples and adding its same-method surrogate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ensemble_core import reproduce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_reproduce_quick_baseline_then_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    # the reference AutoAttack is left to its unit tests here (it is the slowest part of the quick set)
    # (30 white-box and 30 transfer images: what is checked here is the plumbing, not the figures)
    common = ["--quick", "--runs-dir", str(runs), "--wb-examples", "30", "--transfer-examples", "30",
              "--autoattack", "none"]
    assert reproduce.main(["baseline", *common, "--out", str(tmp_path / "baseline.md")]) == 0
    [shared] = list(runs.iterdir())
    cache = sorted(p.name for p in (shared / "transfer-cache").rglob("*.pt"))
    # (FGSM, BIM, MIM: one copy each; PGD: 3 seeds) × 4 eps × 2 losses × 2 surrogates, one batch of 30 images
    assert len(cache) == 96
    for d in ("baseline-m3", "surrogate-m3-s1", "surrogate-m5-s2"):
        assert (shared / d / "ensemble.pt").exists()
    capsys.readouterr()

    assert reproduce.main(["pdd", *common, "--out", str(tmp_path / "pdd.md")]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") >= 4  # baseline, both surrogates, the baseline's evaluation
    after = sorted(p.name for p in (shared / "transfer-cache").rglob("*.pt"))
    assert set(cache) <= set(after)  # no example of the baseline surrogates re-crafted
    assert len(after) - len(cache) == 48  # the same-method surrogate's examples (one 3-member pdd of seed 1)
    assert list((shared / "methods").glob("pdd-m3-*-seed1/ensemble.pt"))
    md = (tmp_path / "pdd.md").read_text()
    assert "Reproduction: `pdd` on MNIST" in md and "| baseline |" in md and "| pdd |" in md
    assert "`--quick`" in md and "python -m ensemble_core.reproduce pdd --quick" in md
    [js] = list((shared / "methods").glob("pdd-m3-*/reproduction-*.json"))
    data = json.loads(js.read_text())
    assert data["method"] == "pdd" and data["target"]["models"]["target"]["method"] == "pdd"
    assert data["baseline"]["models"]["target"]["method"] == "baseline"
    tr = [r for r in data["target"]["records"] if r["threat"] == "transfer" and r["surrogate_group"] == "all"
          and not r["attack"].startswith("worst case")]
    assert len(tr) == 16 and all(r["n_examples"] == 30 for r in tr)
    assert {c["surrogate"] for c in tr[0]["components"]} == {"baseline-3 (seed 1)", "baseline-5 (seed 2)",
                                                            "pdd-3 (seed 1)"}
    groups = {r["surrogate_group"] for r in data["target"]["records"] if r["threat"] == "transfer"}
    assert groups == {"all", "baseline", "same-method"}
    wb = [r for r in data["target"]["records"] if r["attack"] == "pgd-10x2"]
    assert [r["eps"] for r in wb] == [0.1, 0.2, 0.3] and all(r["n_examples"] == 30 for r in wb)
    attacks = {r["attack"] for r in data["target"]["records"] if r["threat"] in ("white-box", "gradient-free")}
    assert {"pgd-10x2 (cw+dlr)", "fgsm (ce+cw)", "square-300q (cw)", "mora-20 (ce+dlr)",
            "pgd-10x2 @20 steps (convergence check)"} <= attacks
    assert "pgd-10x2 (vote+softvote)" not in attacks  # pdd deploys a mean of probabilities, not a vote
    anyrows = [r for r in data["target"]["records"] if r["attack"] == "any attack (Linf)"]
    assert [r["eps"] for r in anyrows] == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert "**any attack**" in md and "same-method" in md

    # the leaderboard's rows come from these very payloads (ensemble_core.leaderboard)
    from ensemble_core import leaderboard as lb

    row = lb.summarise(data)
    assert row["status"] == "done" and len(row["transfer"]) == 16 and len(row["white_box_pgd_ce"]) == 3
    assert len(row["any_attack"]) == 5 and row["any_attack_mean"] is not None
    assert abs(row["transfer_mean"] - sum(r["robust_acc"] for r in tr) / 16) < 1e-12
    assert row["clean_acc"] == data["target"]["clean"]["target"]["clean_acc_transfer_slice"]
    board_dir = tmp_path / "board"
    for name, payload in (("pdd", data), ("baseline", data | {"method": "baseline", "target": data["baseline"]})):
        cell = lb._cell_path(board_dir, "mnist", name)
        cell.parent.mkdir(parents=True, exist_ok=True)
        cell.write_text(json.dumps(lb.summarise(payload)))
    doc = lb.collect(board_dir, ["mnist"], ["baseline", "pdd", "trs"], lb.BUDGET)
    rows = {r["method"]: r for r in doc["datasets"]["mnist"]["rows"]}
    assert {rows["baseline"]["rank"], rows["pdd"]["rank"]} == {1, 2} and rows["trs"]["status"] == "not run"
    assert "| `pdd` |" in lb.render(doc)
