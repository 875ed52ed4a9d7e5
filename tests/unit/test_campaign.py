"""Campaigns (ensemble_core/campaign.py): unit order, keys and surrogates; a tiny campaign trained, skipped,
resumed and evaluated end to end on synthetic data; the records' compressed outcomes; commits of exactly a
unit's files."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import ensemble_core.campaign as cp
from ensemble_core.campaign import (
    Campaign,
    Paths,
    Row,
    SurrogateDecl,
    eval_units,
    pack_bits,
    train_units,
    unpack_bits,
)
from ensemble_core.checkpoint import load_checkpoint, load_ensemble
from ensemble_core.configurations import train_spec

torch.set_num_threads(1)

TINY = Campaign("tiny", "tiny test campaign", "lsd-mnist",
                rows=(Row("baseline", "baseline", "Baseline"), Row("gal", "gal-lsd", "GAL (LSD)", "GAL")),
                seeds=(0, 1), surrogates=(SurrogateDecl("sur", "baseline", 100),
                                          SurrogateDecl("init", "baseline", None, group="same-init")),
                eval_subset=64, overrides={"dataset": "synthetic", "train_subset": 200, "epochs": 1,
                                           "members": 2}, whitebox_seeds=(0,))


def test_pack_bits_by_hand() -> None:
    bits = [True, False, False, False, False, False, False, True, True]
    assert pack_bits(bits) == "gYA="  # 0b10000001, 0b10000000
    assert unpack_bits("gYA=", 9) == bits
    assert unpack_bits(pack_bits(torch.tensor([0, 1, 1])), 3) == [False, True, True]
    with pytest.raises(ValueError):
        unpack_bits("gYA=", 20)


def test_cldl_table4_order_keys_and_surrogates() -> None:
    c = cp.get_campaign("cldl-table4")
    units = train_units(c)
    assert len(units) == 7 * 3 + 2 + 3  # rows x seeds, PROTOCOL's two surrogates, lsd-b5 per seed
    first = [u.id for u in units[:10]]
    assert {u.seed for u in units[:10] if u.role == "target"} == {0}  # seed 0 of every row first
    assert first[-1] == "dverge-s0" and {"surrogate-b3-s100", "surrogate-b5-s101", "lsd-b5-s0"} <= set(first)
    costs = [cp.estimate_cost(u.spec) for u in units[:10]]
    assert costs == sorted(costs)  # cheapest first within a seed
    # then row by row, cheapest row first, each row's seeds 1 and 2 together
    rest = [u.id for u in units[10:]]
    assert rest == ["adp-s1", "adp-s2", "baseline-s1", "baseline-s2", "lsd-b5-s1", "lsd-b5-s2", "cldl-3-2-1-s1",
                    "cldl-3-2-1-s2", "cldl-3-4-4-s1", "cldl-3-4-4-s2", "gal-s1", "gal-s2", "trs-s1", "trs-s2",
                    "dverge-s1", "dverge-s2"]
    assert all(u.spec["epochs"] == 20 and u.spec["extra_pass"] and u.spec["eval_subset"] == 9000 for u in units)
    by_id = {u.id: u for u in units}
    assert by_id["trs-s1"].spec["hyperparameters"]["smooth_points"] == "clean"
    assert by_id["surrogate-b5-s101"].spec["members"] == 5
    assert by_id["lsd-b5-s2"].spec == train_spec("baseline-5", recipe_name="lsd-mnist", seed=2,
                                                 overrides={"eval_subset": 9000, "data_seed": 1002})
    assert "lsd-b3-s0" not in by_id  # seed-matched 3-member baseline = the baseline row's own unit
    for e in eval_units(c):
        names = [n for n, _ in e.surrogates]
        assert all(s.id != e.target.id for _, s in e.surrogates)
        same = [s for n, s in e.surrogates if n.startswith("same-method")]
        assert same[0].configuration == e.target.configuration and same[0].seed == (e.target.seed + 1) % 3
        init = {n: s.id for n, s in e.surrogates if e.groups[n] == "same-init"}
        s = e.target.seed
        if e.target.row == "baseline":  # never against itself: the 5-member one only
            assert init == {f"lsd-b5 (seed {s})": f"lsd-b5-s{s}"} and len(names) == 4
        else:
            assert init == {f"lsd-b3 (seed {s})": f"baseline-s{s}", f"lsd-b5 (seed {s})": f"lsd-b5-s{s}"}
            assert len(names) == 5


def test_cost_estimate_orders_the_methods() -> None:
    c = cp.get_campaign("cldl-table4")
    cost = {u.row: cp.estimate_cost(u.spec) for u in train_units(c) if u.seed == 0 and u.role == "target"}
    assert cost["gal"] == pytest.approx(3 * cost["baseline"]) and cost["gal"] < cost["dverge"]
    assert cost["dverge"] / cost["baseline"] == pytest.approx(15.4, rel=0.05)


@pytest.fixture
def tiny_paths(tmp_path: Path) -> Paths:
    return Paths.of(TINY, root=tmp_path, results_dir=tmp_path / "docs" / "results", runs_dir=tmp_path / "runs")


def test_units_with_work_in_progress_are_trained_first(tiny_paths: Paths) -> None:
    units = train_units(TINY)
    assert [u.id for u in cp.training_queue(tiny_paths, units)] == [u.id for u in units]
    last, third = units[-1], units[2]
    run = tiny_paths.run_dir(last.id)
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"epochs done")  # cut off mid-unit: resumes from runs/
    parked = tiny_paths.parked(third.id, "train.json")
    parked.parent.mkdir(parents=True)
    parked.write_text("{}")  # parked on another clone: resumes from in-progress/
    queue = [u.id for u in cp.training_queue(tiny_paths, units)]
    assert queue == [third.id, last.id] + [u.id for u in units if u.id not in (third.id, last.id)]
    assert cp.in_progress(tiny_paths, last) and not cp.in_progress(tiny_paths, units[0])


@pytest.mark.slow
def test_tiny_campaign_trains_records_skips_and_resumes(tiny_paths: Paths) -> None:
    logs: list[str] = []
    seen: list[tuple[str, bool]] = []  # after_unit sees each unit once its record is written
    done = cp.run_training(TINY, tiny_paths, log=logs.append,
                           after_unit=lambda u: seen.append((u.id, cp.train_done(tiny_paths, u))))
    assert done == [u.id for u in train_units(TINY)] and len(done) == 5
    assert seen == [(u, True) for u in done]
    assert any("ETA" in line and "unit 1/5" in line for line in logs)
    assert "| GAL (LSD) | `gal-lsd` | 0, 1 |" in (tiny_paths.results / "README.md").read_text()  # page kept current
    rec = json.loads(tiny_paths.train_record("gal-s1").read_text())
    assert rec["format"] == cp.TRAIN_FORMAT and rec["configuration"] == "gal-lsd" and rec["seed"] == 1
    assert rec["resolved_spec"]["hyperparameters"]["ce_reduction"] == "mean"
    assert rec["resolved_spec"]["optimizer"]["eps"] == 1e-7 and len(rec["history"]) == 2  # 1 + 1 passes
    # CPU time is kept per epoch and summed; it cannot exceed the wall time much (one thread)
    assert rec["train_cpu_s"] == pytest.approx(sum(h["epoch_cpu_s"] for h in rec["history"]), abs=0.11)
    assert 0 < rec["train_cpu_s"] <= 1.5 * rec["train_time_s"] + 0.2
    ck = tiny_paths.checkpoint("gal-s1")
    assert rec["checkpoint"]["bytes"] == ck.stat().st_size and load_checkpoint(ck)["optimizer"] is None
    # the packed clean outcomes are the checkpoint's: decode and recompute the accuracy
    n = rec["clean"]["n"]
    correct = unpack_bits(rec["clean"]["correct_bits"], n)
    assert sum(correct) / n == pytest.approx(rec["clean"]["acc"])
    from ensemble_core.data import load_dataset, test_subset, to_float

    test = test_subset(load_dataset("synthetic", "test"), "report")  # all of it, as the record
    ens = load_ensemble(ck)
    with torch.no_grad():
        pred = ens.predict(to_float(test.images))
    assert (pred == test.labels).tolist() == correct
    # a second run trains nothing
    assert cp.run_training(TINY, tiny_paths, log=lambda m: None) == []
    # a unit cut off after its first pass resumes from runs/ instead of restarting
    assert "remain" not in cp.render_report(TINY, tiny_paths)
    unit = next(u for u in train_units(TINY) if u.id == "baseline-s0")
    tiny_paths.train_record(unit.id).unlink()
    # the page says what is left, at the pace of the recorded units: their median-epoch time per unit of cost
    rate = sum(cp.robust_wall_s(json.loads(tiny_paths.train_record(u.id).read_text())) for u in train_units(TINY)
               if u.id != unit.id) / sum(cp.estimate_cost(u.spec) for u in train_units(TINY) if u.id != unit.id)
    assert cp.calibrated_clock(tiny_paths, train_units(TINY)).rate == pytest.approx(rate)
    # a record without CPU time (trained by older code, slower) is left out while others kept theirs
    old = tiny_paths.train_record("gal-s1")
    kept = old.read_text()
    rec_old = json.loads(kept)
    rec_old["train_cpu_s"] = None
    for h in rec_old["history"]:
        h["epoch_time_s"] *= 100
    old.write_text(json.dumps(rec_old))
    others = [u for u in train_units(TINY) if u.id not in (unit.id, "gal-s1")]
    rate_new = sum(cp.robust_wall_s(json.loads(tiny_paths.train_record(u.id).read_text())) for u in others) / \
        sum(cp.estimate_cost(u.spec) for u in others)
    assert cp.calibrated_clock(tiny_paths, train_units(TINY)).rate == pytest.approx(rate_new)
    old.write_text(kept)
    left = cp._fmt_s(cp.estimate_cost(unit.spec) * rate)
    assert f"1 training unit remains: about {left} of one CPU core" in cp.render_report(TINY, tiny_paths)
    run = tiny_paths.run_dir(unit.id)
    (run / "ensemble.pt").unlink()
    state = load_checkpoint(run / "checkpoint.pt")
    state["progress"]["epoch"] = 1
    state["history"] = json.dumps(json.loads(state["history"])[:1])
    torch.save(state, run / "checkpoint.pt")
    logs.clear()
    assert cp.run_training(TINY, tiny_paths, log=logs.append) == ["baseline-s0"]
    assert any("resuming at stage 1/1, epoch 2/2" in line for line in logs)
    # a partial run of another declaration is never resumed: the unit starts again
    tiny_paths.train_record(unit.id).unlink()
    (run / "ensemble.pt").unlink()
    torch.save(state, run / "checkpoint.pt")
    (run / "declared_spec.json").write_text(json.dumps({**unit.spec, "data_seed": 7}))
    logs.clear()
    assert cp.run_training(TINY, tiny_paths, log=logs.append) == ["baseline-s0"]
    assert any("declaration changed" in line for line in logs), logs
    assert not any("resuming" in line for line in logs)
    assert json.loads((run / "declared_spec.json").read_text()) == unit.spec
    # a changed declaration (another digest) is not the recorded unit
    changed = Campaign(**{**TINY.__dict__, "overrides": {**TINY.overrides, "train_subset": 190}})
    assert not cp.train_done(tiny_paths, train_units(changed)[0])


@pytest.mark.slow
def test_tiny_campaign_evaluates_and_keys_on_the_evaluation_code(tiny_paths: Paths,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cp.run_training(TINY, tiny_paths, log=lambda m: None)

    def tiny_spec(dataset: str, checkpoint: str, **kw: Any) -> dict[str, Any]:
        return {"target_checkpoint": checkpoint, "n_examples": 12, "seed": 0, "split": "report",
                "attacks": [{"name": "fgsm", "eps": [0.1]}], "transfer_attacks": [{"name": "fgsm", "eps": [0.1],
                                                                                   "losses": ["ce", "cw"]}],
                "member_transfer": None, "checks": {"n_examples": 4, "convergence": False, "large_eps": None}}

    monkeypatch.setattr(cp, "campaign_evaluation_spec", tiny_spec)
    done = cp.run_evaluations(TINY, tiny_paths, log=lambda m: None)
    assert done == [u.id for u in eval_units(TINY)]
    rec = json.loads(tiny_paths.eval_record("gal-s0").read_text())
    assert rec["format"] == cp.EVAL_FORMAT and set(rec["surrogates"]) == {"sur (seed 100)", "init (seed 0)",
                                                                           "same-method gal (seed 1)"}
    assert {v["group"] for v in rec["surrogates"].values()} == {"baseline", "same-init", "same-method"}
    assert rec["surrogates"]["init (seed 0)"]["unit"] == "baseline-s0"  # seed-matched: the row's own unit
    # ... and never the target itself: the baseline row has no same-init surrogate at all
    rec_b = json.loads(tiny_paths.eval_record("baseline-s0").read_text())
    assert set(rec_b["surrogates"]) == {"sur (seed 100)", "same-method baseline (seed 1)"}
    tr = [r for r in rec["records"] if r["threat"] == "transfer" and r["model"] == "target"
          and r.get("surrogate_group") == "baseline" and r.get("components")]
    assert tr and len(tr[0]["components"]) == 2  # the baseline surrogate x 2 losses
    mean = sum(c["robust_acc"] for c in tr[0]["components"]) / 2
    assert rec["paper_mean"][tr[0]["attack"]][str(tr[0]["eps"])] == pytest.approx(mean, abs=1e-6)
    assert mean >= tr[0]["robust_acc"] - 1e-9  # the mean over sets is never below the per-image worst case
    state = cp.decompress_json(rec["per_example_state_zlib_b64"])
    assert state["hi"] - state["lo"] == 12
    # the white-box suite runs on the whitebox_seeds' targets only; the others are scored by transfer alone
    assert any(r["threat"] == "white-box" and r["model"] == "target" for r in rec["records"])
    rec1 = json.loads(tiny_paths.eval_record("gal-s1").read_text())
    assert rec1["evaluation_spec"]["attacks"] == [] and rec["evaluation_spec"]["attacks"]
    assert not any(r["threat"] == "white-box" for r in rec1["records"])
    assert any(r["threat"] == "transfer" and r["model"] == "target" for r in rec1["records"])
    # same code and spec: skipped; changed evaluation code: re-evaluated, the training untouched
    t_rec = tiny_paths.eval_record("baseline-s0").stat().st_mtime_ns
    logs: list[str] = []
    assert cp.run_evaluations(TINY, tiny_paths, log=logs.append, max_units=1) == ["baseline-s0"]
    assert tiny_paths.eval_record("baseline-s0").stat().st_mtime_ns == t_rec
    assert any("already recorded" in line for line in logs)
    logs.clear()  # units found recorded take no time and do not count for the ETA of the next ones
    assert cp.run_evaluations(TINY, tiny_paths, log=logs.append, max_units=3) == [u.id for u in eval_units(TINY)][:3]
    assert not any("ETA" in line for line in logs), logs
    before = {u.id: tiny_paths.train_record(u.id).stat().st_mtime_ns for u in train_units(TINY)}
    fp0 = json.loads(tiny_paths.eval_record("baseline-s0").read_text())["fingerprint"]
    monkeypatch.setattr(cp, "evaluation_code_digest", lambda root=None: "changed-code")
    cp.run_evaluations(TINY, tiny_paths, log=lambda m: None, max_units=1)
    assert json.loads(tiny_paths.eval_record("baseline-s0").read_text())["fingerprint"] != fp0
    assert before == {u.id: tiny_paths.train_record(u.id).stat().st_mtime_ns for u in train_units(TINY)}
    page = cp.render_report(TINY, tiny_paths)
    # the records of the earlier code are named on the page and in --status until the campaign re-runs them
    stale_line = next(x for x in page.splitlines() if x.startswith("**Evaluated with earlier evaluation code**"))
    assert "(3 of 4 records; this tree's is `changed-code`)" in stale_line, stale_line
    assert "`gal-s0` (`" in stale_line and "`baseline-s0`" not in stale_line
    status = {ln.split()[1]: ln for ln in cp.status_table(TINY, tiny_paths).splitlines() if ln.split()[:1] == ["eval"]}
    assert status["gal-s0"].endswith("recorded with earlier evaluation code (re-runs)")
    assert status["baseline-s0"].endswith("recorded")
    # and on the leaderboard's headline
    from ensemble_core import leaderboard as lb

    head = cp.headline(TINY, tiny_paths)
    assert head["stale_evaluations"] == sorted(u.id for u in eval_units(TINY) if u.id != "baseline-s0")
    assert (f"**3 of the 4 evaluation records were made with earlier evaluation code** "
            f"({', '.join(f'`{u}`' for u in head['stale_evaluations'])}): the campaign re-runs them"
            in "\n".join(lb.render_headline([head])))
    assert "| GAL (LSD) | `gal-lsd` | 0, 1 |" in page, page
    assert "| GAL (LSD) | fgsm" in page
    # the same-init group gets its own table, from its own records (not the paper group's)
    init_part = page[page.index("## Black-box transfer from the `same-init` surrogates"):page.index("## White-box")]
    init_vals = [100 * next(r["robust_acc"] for r in json.loads(tiny_paths.eval_record(f"gal-s{s}").read_text())
                            ["records"] if r["threat"] == "transfer" and r["model"] == "target"
                            and r.get("surrogate_group") == "same-init" and r["attack"].startswith("fgsm"))
                 for s in (0, 1)]
    mean_i = sum(init_vals) / 2
    assert f"| GAL (LSD) | fgsm (ce+cw) | 0.1 | {mean_i:.1f} ± " in init_part, init_part
    assert "| Baseline | fgsm" not in init_part  # its only seed-matched surrogate would be itself
    # with a paper figure: the cell says whether it lies within two of our seed sd of our mean (by hand)
    vals = [100 * next(r["robust_acc"] for r in json.loads(tiny_paths.eval_record(f"gal-s{s}")
                                                                         .read_text())["records"]
                       if r["threat"] == "transfer" and r["model"] == "target" and r.get("surrogate_group") ==
                       "baseline" and r["attack"].startswith("fgsm") and r["eps"] == 0.1) for s in (0, 1)]
    mean, sd = sum(vals) / 2, abs(vals[0] - vals[1]) / 2 ** 0.5
    for figure in (mean + 2 * sd + 0.5, mean):
        with_paper = Campaign(**{**TINY.__dict__, "paper_denominator": "all",  # the tiny plan keeps no clean-correct
                                 "paper": {"eps": [0.1], "columns": {"GAL": {"FGSM": [figure]}}}})
        line = next(x for x in cp.render_report(with_paper, tiny_paths).splitlines()
                    if x.startswith("| GAL (LSD) | fgsm"))
        assert line.split(" | ")[7] == ("no" if figure > mean + 2 * sd else "yes"), line
    wb = page[page.index("## White-box"):]
    worst = next(r for r in rec["records"] if r["model"] == "target" and r["threat"] == "worst-case"
                 and r["attack"].startswith("worst case (Linf"))
    assert f"| GAL (LSD) | 0.1 | {100 * worst['robust_acc']:.1f} (n 1)" in wb and "seed 0;" in wb, wb
    # the leaderboard's headline: the paper group's transfer worst case per seed, mean and sd by hand
    tw = [next(r["robust_acc"] for r in json.loads(tiny_paths.eval_record(f"gal-s{s}").read_text())["records"]
               if r["model"] == "target" and r["threat"] == "transfer" and r.get("surrogate_group") == "baseline"
               and r["attack"] == "worst case (transfer, Linf)" and r["eps"] == 0.1) for s in (0, 1)]
    h = cp.headline(Campaign(**{**TINY.__dict__, "paper_denominator": "all"}), tiny_paths)
    assert h["train_units"] == {"recorded": len(train_units(TINY)), "declared": len(train_units(TINY))}
    assert h["eval_units"] == {"recorded": 4, "declared": 4}
    gal = next(r for r in h["rows"] if r["row"] == "gal")
    assert gal["seeds_trained"] == [0, 1] and gal["seeds_evaluated"] == [0, 1]
    cell = gal["transfer_worst"][0]
    assert cell["eps"] == 0.1 and cell["all"]["n"] == 2
    assert cell["all"]["mean"] == pytest.approx((tw[0] + tw[1]) / 2, abs=1e-6)
    assert cell["all"]["sd"] == pytest.approx(abs(tw[0] - tw[1]) / 2 ** 0.5, abs=1e-6)
    assert gal["white_box_worst"] == [{"eps": 0.1, "all": {"mean": worst["robust_acc"], "sd": None, "n": 1},
                                       "clean_correct": gal["white_box_worst"][0]["clean_correct"]}]
    md = "\n".join(lb.render_headline([h]))
    sd = f" ± {100 * cell['all']['sd']:.1f}" if cell["all"]["sd"] else " ± 0.0"
    assert f"| {100 * cell['all']['mean']:.1f}{sd} (n 2) | {100 * worst['robust_acc']:.1f} (n 1) |" in md, md
    assert "4 of 4 evaluation units recorded" in md
    assert h["evaluation"] == {"split": "report", "seed": 0, "transfer_images": 12, "white_box_images": 12,
                               "white_box_attacks": ["fgsm"]}  # the tiny spec: 12 images, white-box FGSM on seed 0
    assert "Transfer on a seeded 12-image slice of the report subset, white-box on the first 12 of them (fgsm); " \
           "evaluation seed 0" in md


def test_git_commit_commits_exactly_the_units_files(tmp_path: Path) -> None:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("someone else's work\n")
    git("add", "other.txt")  # staged by someone else
    rec, ck = tmp_path / "r" / "u.json", tmp_path / "r" / "u.pt"
    rec.parent.mkdir()
    rec.write_text("{}")
    ck.write_bytes(b"\x00\x01")
    assert cp.git_commit(tmp_path, [rec, ck], "campaign t: u trained")
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == ["r/u.json", "r/u.pt"]
    assert "other.txt" in git("diff", "--cached", "--name-only")  # still staged, not committed
    assert not cp.git_commit(tmp_path, [rec], "again")  # nothing changed: no empty commit


@pytest.mark.slow
def test_parked_work_in_progress_resumes_on_a_fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--park keeps an unfinished unit's state in the repository; a clone without runs/ resumes from it, and the
    unit's own commit removes the parked files."""
    import shutil

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    paths = Paths.of(TINY, root=tmp_path, results_dir=tmp_path / "docs" / "results", runs_dir=tmp_path / "runs")
    cp.run_training(TINY, paths, log=lambda m: None)

    def tiny_spec(dataset: str, checkpoint: str, **kw: Any) -> dict[str, Any]:
        return {"target_checkpoint": checkpoint, "n_examples": 12, "seed": 0, "split": "report",
                "attacks": [{"name": "fgsm", "eps": [0.1]}], "transfer_attacks": [{"name": "fgsm", "eps": [0.1]}],
                "member_transfer": None, "checks": {"n_examples": 4, "convergence": False, "large_eps": None}}

    monkeypatch.setattr(cp, "campaign_evaluation_spec", tiny_spec)
    monkeypatch.setattr(cp, "_refresh_leaderboard", lambda paths: [])
    assert cp.run_evaluations(TINY, paths, log=lambda m: None, max_units=1) == ["baseline-s0"]
    assert cp.park(TINY, paths, log=lambda m: None) == []  # everything recorded: nothing to park
    git("add", "docs")
    git("commit", "-q", "-m", "units")

    # an evaluation cut off with its pieces computed (its record not yet written), parked, resumed without runs/
    full_eval = json.loads(paths.eval_record("baseline-s0").read_text())
    paths.eval_record("baseline-s0").unlink()
    changed = cp.park(TINY, paths, log=lambda m: None)
    assert changed == [paths.parked("baseline-s0", "eval.json")]
    parked_eval = json.loads(changed[0].read_text())
    assert parked_eval["fingerprint"] == full_eval["fingerprint"] and parked_eval["pieces_done"] > 0
    assert cp.git_commit(tmp_path, changed, "parked")
    assert f"baseline-s0            partial (resumes from runs/: {parked_eval['pieces_done']} pieces done)" in \
        cp.status_table(TINY, paths)
    shutil.rmtree(paths.runs / "eval")
    assert f"baseline-s0            parked, {parked_eval['pieces_done']} pieces done" in cp.status_table(TINY, paths)
    logs: list[str] = []
    assert cp.run_evaluations(TINY, paths, commit=True, log=logs.append, max_units=1) == ["baseline-s0"]
    assert any(f"resuming from the parked evaluation state ({parked_eval['pieces_done']} pieces" in line
               for line in logs), logs
    assert any(f"({parked_eval['pieces_done']} pieces done)" in line and "resuming evaluation from" in line
               for line in logs), logs  # the evaluation took the pieces as done
    again = json.loads(paths.eval_record("baseline-s0").read_text())
    a, b = (cp.decompress_json(r["per_example_state_zlib_b64"]) for r in (again, full_eval))
    ta, tb = a.pop("timings"), b.pop("timings")
    assert a == b  # the same per-example outcomes, taken from the parked state, not recomputed:
    assert ta == pytest.approx(tb, rel=1e-3)  # the first run's timings
    # the record says the evaluation was resumed, and its attack time counts the pieces of the earlier process
    assert (full_eval["resumed_pieces"], again["resumed_pieces"]) == (0, parked_eval["pieces_done"])
    assert again["attack_time_s"] == round(sum(ta.values()), 1)
    assert again["attack_time_s"] == pytest.approx(full_eval["attack_time_s"], abs=0.11)
    assert not paths.parked("baseline-s0", "eval.json").exists()
    assert "D\tdocs/results/tiny/in-progress/baseline-s0.eval.json" in git("show", "--name-status", "--format=",
                                                                           "HEAD")

    # a training unit cut off after its first pass, parked, resumed without runs/
    unit = next(u for u in train_units(TINY) if u.id == "baseline-s0")
    run = paths.run_dir(unit.id)
    for q in (paths.train_record(unit.id), paths.checkpoint(unit.id), run / "ensemble.pt"):
        q.unlink()
    state = load_checkpoint(run / "checkpoint.pt")
    state["progress"]["epoch"] = 1
    state["history"] = json.dumps(json.loads(state["history"])[:1])
    torch.save(state, run / "checkpoint.pt")
    changed = cp.park(TINY, paths, log=lambda m: None)
    assert sorted(q.name for q in changed) == ["baseline-s0.train.json", "baseline-s0.train.pt"]
    assert (run / "checkpoint.pt").read_bytes() == paths.parked(unit.id, "train.pt").read_bytes()
    meta = json.loads(paths.parked(unit.id, "train.json").read_text())
    assert meta["progress"]["epoch"] == 1 and meta["declared_digest"] == unit.digest
    assert cp.park(TINY, paths, log=lambda m: None) == []  # unchanged since: nothing new
    assert cp.git_commit(tmp_path, changed, "parked")
    shutil.rmtree(paths.runs)
    assert "parked at 1/2 passes (resumes from in-progress/)" in cp.status_table(TINY, paths)
    logs.clear()
    assert cp.run_training(TINY, paths, commit=True, log=logs.append) == ["baseline-s0"]
    assert any("resuming from the parked checkpoint (1/2 passes" in line for line in logs), logs
    assert any("resuming at stage 1/1, epoch 2/2" in line for line in logs), logs
    assert not paths.parked(unit.id, "train.pt").exists() and not paths.parked(unit.id, "train.json").exists()
    status = git("show", "--name-status", "--format=", "HEAD")
    assert "D\tdocs/results/tiny/in-progress/baseline-s0.train.pt" in status, status  # removed in the unit's commit
    assert "M\tdocs/results/tiny/train/baseline-s0.json" in status  # the record written again
    assert "in-progress" not in cp.status_table(TINY, paths)
    # a parked checkpoint of another declaration is never resumed
    (paths.results / "in-progress").mkdir(exist_ok=True)
    shutil.copyfile(paths.checkpoint(unit.id), paths.parked(unit.id, "train.pt"))
    paths.parked(unit.id, "train.json").write_text(json.dumps({**meta, "declared_digest": "other"}))
    logs.clear()
    assert not cp.unpark_train(unit, paths, tmp_path / "fresh", log=logs.append)
    assert "ignoring" in logs[0] and not (tmp_path / "fresh" / "checkpoint.pt").exists()


def test_dkd_table3_is_the_table_one_network_with_three_voters() -> None:
    from ensemble_core.ensemble import combine_rule
    from ensemble_core.methods import get_method
    from ensemble_core.spec import TrainSpec

    c = cp.get_campaign("dkd-table3")
    units = {u.id: u for u in train_units(c)}
    assert units["surrogate-lenet-s100"].spec["architecture"] == "lenet5_classic"
    for row in ("dkd", "kd", "ri"):
        spec = TrainSpec.model_validate(units[f"{row}-s0"].spec)
        assert spec.architecture == "dkd_mnist" and spec.batch_size == 64 and spec.optimizer.lr == 1e-4
        m = get_method(spec.method).from_spec_dict(spec.hyperparameters, members=spec.members, num_classes=10,
                                                   dataset="mnist", architecture=spec.architecture)
        rule = combine_rule(spec.combine or m.combine())
        assert rule.vote is not None and rule.vote.voters(torch.zeros(spec.members, 1, 10)).shape[0] == 3
    assert units["kd-s0"].spec["hyperparameters"]["objective"] == "kd"


def test_dkd_table3_compares_the_lenet_surrogate_with_table_three() -> None:
    from ensemble_core.spec import AttackSpec

    c = cp.get_campaign("dkd-table3")
    for e in eval_units(c):
        assert e.paper_group == "lenet" and sorted(e.groups.values()) == ["baseline", "lenet", "same-method"]
        assert [AttackSpec.model_validate(a).eps for a in e.extra_transfer_attacks] == [[0.04, 0.08]]
    assert c.paper_denominator == "all" and cp.get_campaign("cldl-table4").paper_denominator == "clean_correct"


def test_training_time_leaves_out_paused_epochs() -> None:
    """A unit paused (SIGSTOP) for an hour in one epoch: the report shows its CPU time, or, in a record made
    before CPU time was kept, per stage the median epoch × epochs, and the ETA clock reads the latter."""
    hist = ([{"stage": 0, "epoch_time_s": t} for t in (100.0, 110.0, 3700.0, 90.0, 105.0)]
            + [{"stage": 1, "epoch_time_s": t} for t in (300.0, 320.0, 310.0)])
    rec = {"history": hist, "train_time_s": sum(h["epoch_time_s"] for h in hist), "machine": {"device": "cpu"}}
    assert cp.robust_wall_s(rec) == 105.0 * 5 + 310.0 * 3  # medians 105 and 310, not the 5,035 s wall sum
    assert cp.train_time_cell(rec) == "≈ 24 min †"
    assert cp.train_time_cell({**rec, "train_cpu_s": 1500.0}) == "25 min"  # measured CPU time wins
    assert cp.train_time_cell({**rec, "machine": {"device": "cuda:0"}, "train_cpu_s": 9.0}) == "84 min (wall)"
    assert cp.robust_wall_s({"train_time_s": 42.0}) == 42.0  # no history: the recorded sum
    clock = cp.CostClock()
    clock.add(10.0, cp.robust_wall_s(rec))
    assert clock.rate == pytest.approx(145.5)


def test_the_preliminary_page_is_what_its_script_makes_of_its_record() -> None:
    """docs/results/cldl-table4/preliminary: README.md is regenerated from the JSON beside it, byte for byte, and
    its cells are the JSON's (a hand edit of either fails here)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[2] / "docs/results/cldl-table4/preliminary"
    spec = importlib.util.spec_from_file_location("prelim_run", folder / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = mod.page()
    assert page == (folder / "README.md").read_text()
    data = json.loads((folder / "seed0-baseline-surrogates.json").read_text())
    r = next(r for r in data["cldl-3-4-4-s0"]["records"] if r["attack"].startswith("pgd") and r["eps"] == 0.2)
    assert r["n_robust"] / r["n_clean_correct"] == pytest.approx(r["robust_acc_among_correct"])
    assert f"| CLDL(3,4,4) | {100 * r['clean_acc']:.1f} |" in page
    assert f"{100 * r['robust_acc_among_correct']:.1f} / 58.94" in page  # ours beside Table IV's PGD ε 0.2
    check = json.loads((folder / "advertorch-check.json").read_text())
    c = check["0.2"]["cells"]["cldl-3-4-4-s0"]["pgd"]
    assert c["ours"] == pytest.approx(100 * r["robust_acc_among_correct"], abs=0.005)  # the same cell, both files
    assert f"| CLDL(3,4,4) | PGD | {c['ours']:.2f} | {c['advertorch ce+cw']:.2f} | {c['advertorch ce+cw-lsd']:.2f} |" \
        in page
    lsd = check["0.2 baseline-s0+lsd-b5-s0"]  # the LSD code's own pair: the targets' seed, 3 and 5 members
    assert lsd["surrogates"] == {"lsd-b3": "baseline-s0", "lsd-b5": "lsd-b5-s0"}
    t, tp = lsd["cells"]["trs-s0"]["pgd"]["advertorch ce+cw-lsd"], check["0.2"]["cells"]["trs-s0"]["pgd"]
    assert f"| TRS (LSD) | PGD | {tp['advertorch ce+cw-lsd']:.2f} | {t:.2f} | 39.19 | {t - 39.19:+.2f} |" in page


def test_cldl_page_quotes_the_advertorch_check() -> None:
    """docs/methods/cldl.md's figures on the LSD code's evaluation are the preliminary record's (seed 0, ε 0.2)."""
    root = Path(__file__).resolve().parents[2]
    text = " ".join((root / "docs/methods/cldl.md").read_text().split())
    data = json.loads((root / "docs/results/cldl-table4/preliminary/advertorch-check.json").read_text())
    cells = data["0.2"]["cells"]
    lsd = {f: max(c[f]["advertorch ce+cw-lsd"] - c[f]["advertorch ce+cw"] for c in cells.values())
           for f in ("pgd", "fgsm")}
    assert f"at most {lsd['pgd']:.1f} points at PGD ε 0.2 ({lsd['fgsm']:.1f} at FGSM)" in text
    lib = max(abs(c[f]["advertorch ce+cw"] - c[f]["ours"]) for c in cells.values() for f in c if f in
              ("fgsm", "bim", "mim", "pgd"))
    assert f"at most {lib:.2f} points from AdverTorch's" in text
    same, indep = data["0.2 baseline-s0"]["cells"], data["0.2 surrogate-b3-s100"]["cells"]
    drop = {u: indep[u]["pgd"]["advertorch ce+cw-lsd"] - same[u]["pgd"]["advertorch ce+cw-lsd"] for u in same}
    others = [v for u, v in drop.items() if u != "cldl-3-4-4-s0"]
    assert f"by {min(others):.1f}–{max(others):.1f} points at PGD ε 0.2, and CLDL(3,4,4) by " \
           f"{drop['cldl-3-4-4-s0']:.1f}" in text
    ctrl = data["0.2 surrogate-b5-s101[:3]"]["cells"]
    drop2 = {u: ctrl[u]["pgd"]["advertorch ce+cw-lsd"] - same[u]["pgd"]["advertorch ce+cw-lsd"] for u in same}
    others2 = [v for u, v in drop2.items() if u != "cldl-3-4-4-s0"]
    ab = max(abs(ctrl[u]["pgd"]["advertorch ce+cw-lsd"] - indep[u]["pgd"]["advertorch ce+cw-lsd"]) for u in same)
    assert f"({min(others2):.1f}–{max(others2):.1f} and {drop2['cldl-3-4-4-s0']:.1f} against a second; the two " \
           f"independent ones differ by at most {ab:.1f} on a row)" in text
    probe = json.loads((root / "docs/results/cldl-table4/preliminary/cos-floor-probe.json").read_text())
    assert probe["initialisation"]["fraction_below_floor"] == probe["trained"]["fraction_below_floor"] == 0.0
    assert f"(1st percentile {probe['initialisation']['quantiles']['0.01']:.4f}) nor after training " \
           f"({probe['trained']['quantiles']['0.01']:.4f}), against a floor of {probe['floor']:.5f}" in text
    lsd = data["0.2 baseline-s0+lsd-b5-s0"]["cells"]
    paper = cp.get_campaign("cldl-table4").paper["columns"]

    def span(unit: str, column: str) -> list[float]:
        return sorted(lsd[unit][f]["advertorch ce+cw-lsd"] - paper[column][f.upper()][2]
                      for f in ("fgsm", "bim", "mim", "pgd"))

    trs, adp, gal, cldl = (span(u, col) for u, col in (("trs-s0", "TRS"), ("adp-s0", "ADP"), ("gal-s0", "GAL"),
                                                        ("cldl-3-4-4-s0", "CLDL(3,4,4)")))
    assert f"TRS lands within {max(abs(v) for v in trs):.2f} points of Table IV at every attack, ADP " \
           f"{-adp[-1]:.2f}–{-adp[0]:.2f} below it, GAL {gal[0]:.2f}–{gal[-1]:.2f} above, and CLDL(3,4,4) " \
           f"{-cldl[-1]:.2f}–{-cldl[0]:.2f} below" in text
    # the data-order ablation: a second CLDL(3,4,4) training from the seed-0 weights, on both pairs
    ab = "cldl-3-4-4-s0-data1000"
    rec = json.loads((root / f"docs/results/cldl-table4/preliminary/ablation/cldl-table4/train/{ab}.json").read_text())
    assert f"Clean accuracy {100 * rec['clean']['acc']:.2f} %" in text
    pgd = {k: {u: data[f"{k} → cldl-3-4-4-s0+{ab}"]["cells"][u]["pgd"]["advertorch ce+cw-lsd"]
               for u in ("cldl-3-4-4-s0", ab)} for k in ("0.2", "0.2 baseline-s0+lsd-b5-s0")}
    proto, lsd_pair = pgd["0.2"], pgd["0.2 baseline-s0+lsd-b5-s0"]
    assert f"{proto[ab]:.2f} with PROTOCOL's independent pair (seed-0 row {proto['cldl-3-4-4-s0']:.2f}, " \
           f"{proto[ab] - proto['cldl-3-4-4-s0']:+.2f}) and {lsd_pair[ab]:.2f} with the LSD code's pair (seed-0 row " \
           f"{lsd_pair['cldl-3-4-4-s0']:.2f}, {lsd_pair[ab] - lsd_pair['cldl-3-4-4-s0']:+.2f})" in text
    moves = [data[f"{k} → cldl-3-4-4-s0+{ab}"]["cells"][ab][f]["advertorch ce+cw-lsd"]
             - data[f"{k} → cldl-3-4-4-s0+{ab}"]["cells"]["cldl-3-4-4-s0"][f]["advertorch ce+cw-lsd"]
             for k in pgd for f in ("bim", "mim")]
    assert f"BIM and MIM move by {min(moves):.1f}–{max(moves):.1f} points" in text
    assert proto["cldl-3-4-4-s0"] == cells["cldl-3-4-4-s0"]["pgd"]["advertorch ce+cw-lsd"]  # reproduced exactly
    readme = " ".join((root / "README.md").read_text().split())
    assert f"scores {proto[ab]:.2f} % at transfer PGD ε = 0.2 against the seed-0 training's " \
           f"{proto['cldl-3-4-4-s0']:.2f}" in readme


def test_the_data_order_ablation_differs_from_its_row_only_in_data_seed() -> None:
    """preliminary/ablation.py's unit: the campaign's cldl-3-4-4-s0 spec with data_seed 1000 and nothing else."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "docs/results/cldl-table4/preliminary/ablation.py"
    spec = importlib.util.spec_from_file_location("ablation", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    u = mod.unit("cldl-3-4-4-s0-data1000")
    row = next(x for x in train_units(cp.get_campaign("cldl-table4")) if x.id == "cldl-3-4-4-s0")
    assert {**u.spec, "data_seed": None} == {**row.spec, "data_seed": None} and u.spec["data_seed"] == 1000
    assert "data_seed" not in row.spec and mod.paths().run_dir(u.id).name == u.id


def test_the_lsd_cw_loss_is_the_degenerate_form_the_page_describes() -> None:
    """advertorch_check.py's two CW losses on log-probabilities, by hand: ours is the margin to the best other
    class; the LSD code's form compares log p_y with 0 (the masked true entry), so it is −relu(log p_y + κ)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "docs/results/cldl-table4/preliminary/advertorch_check.py"
    spec = importlib.util.spec_from_file_location("advertorch_check", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # advertorch itself is imported only when attacking
    z = torch.log(torch.tensor([[0.95, 0.04, 0.01], [0.5, 0.3, 0.2]]))
    y = torch.tensor([0, 0])
    # ours: −relu(log .95 − log .04 + .1) − relu(log .5 − log .3 + .1)
    want_cw = -((math.log(0.95 / 0.04) + 0.1) + (math.log(0.5 / 0.3) + 0.1))
    assert float(mod.cw_margin_loss(z, y)) == pytest.approx(want_cw, rel=1e-5)
    # LSD's: −relu(log .95 + .1) − relu(log .5 + .1) = −(0.1 − 0.051293) − 0
    assert float(mod.cw_lsd_loss(z, y)) == pytest.approx(-(math.log(0.95) + 0.1), rel=1e-5)


def test_claims_are_judged_from_paired_seed_differences() -> None:
    """The page's claims section: per attack family at the headline ε, each row above the next in the paper's
    order; verdicts from the per-seed paired differences (two standard errors), computed here by hand."""
    assert cp.claim_verdict([3.0]) == "not resolved with 1 seed"
    assert cp.claim_verdict([1.0, -1.0]) == "not resolved with 2 seeds"
    assert cp.claim_verdict([10.0, 11.0, 12.0]) == "held"  # mean 11, se 1/√3
    assert cp.claim_verdict([-5.0, -6.0, -7.0]) == "not held"
    assert cp.claim_verdict([1.0, 5.0, -2.0]) == "not resolved with 3 seeds"  # mean 1.33, se 2.03
    c = Campaign("claims", "claims test", "lsd-mnist",
                 rows=(Row("adp", "adp-lsd", "ADP (LSD)", "ADP"), Row("gal", "gal-lsd", "GAL (LSD)", "GAL")),
                 seeds=(0, 1, 2), surrogates=(SurrogateDecl("sur", "baseline", 100),),
                 paper={"eps": [0.1, 0.2], "columns": {"GAL": {"PGD": [80.0, 30.0]}, "ADP": {"PGD": [70.0, 20.0]}}})

    def rec(v: float, group: str = "baseline") -> dict[str, Any]:
        return {"threat": "transfer", "model": "target", "eps": 0.2, "surrogate_group": group,
                "attack": "pgd-10x3 (ce+cw)", "robust_acc_among_correct": v}

    evals = {f"gal-s{s}": {"records": [rec(g), rec(0.99, "same-method")]} for s, g in enumerate((0.30, 0.32, 0.31))}
    evals.update({f"adp-s{s}": {"records": [rec(a)]} for s, a in enumerate((0.20, 0.21, 0.19))})
    lines = cp._claims_section(c, evals)
    assert "| GAL (LSD) above ADP (LSD), PGD | +10.00 | +11.0 ± 1.0 (n 3) | held |" in lines, lines
    del evals["gal-s2"]  # two seeds left: differences 10 and 11
    assert "| GAL (LSD) above ADP (LSD), PGD | +10.00 | +10.5 ± 0.7 (n 2) | held |" in cp._claims_section(c, evals)
    assert cp._claims_section(c, {}) == []
    # only rows without a paper figure evaluated (the baseline): no claim, so no section (not an empty table)
    assert cp._claims_section(c, {"adp-s0": {"records": [rec(0.2)]}}) == []



def test_the_leaderboard_headline_is_rewritten_from_the_records_and_the_quick_rows_kept(tmp_path: Path) -> None:
    """refresh_headline (called by the campaign runner after each unit): the campaigns' summaries replace the
    headline; the quick-mode rows are the published ones, unchanged; no leaderboard, nothing written."""
    from ensemble_core import leaderboard as lb

    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    assert lb.refresh_headline(tmp_path) == []
    published = json.loads((root / "leaderboard.json").read_text())
    (tmp_path / "leaderboard.json").write_text(json.dumps({k: v for k, v in published.items() if k != "headline"}))
    written = lb.refresh_headline(tmp_path, results_dir=tmp_path)  # no campaign records here
    assert written == [tmp_path / "leaderboard.json", tmp_path / "leaderboard.md"]
    doc = json.loads(written[0].read_text())
    assert doc["datasets"] == published["datasets"] and doc["generated_at"] == published["generated_at"]
    assert [h["campaign"] for h in doc["headline"]] == list(cp.CAMPAIGNS)
    assert all(h["train_units"]["recorded"] == 0 and h["eval_units"]["recorded"] == 0 for h in doc["headline"])
    md = written[1].read_text()
    assert md.index("## Headline") < md.index("## Quick mode") < md.index("### MNIST (quick mode)")
    assert md.count("No training unit recorded yet.") == len(cp.CAMPAIGNS)
    # the published page's headline is what the records in docs/results make of it now (kept current by the
    # campaign runner, which rewrites it with every unit it records)
    current = cp.headline(cp.get_campaign("cldl-table4"), Paths.of(cp.get_campaign("cldl-table4")))
    pub = next(h for h in published.get("headline", []) if h["campaign"] == "cldl-table4")
    assert pub["rows"] == current["rows"] and pub["train_units"] == current["train_units"]


def test_phase_all_evaluates_whatever_is_ready_between_trainings(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--phase all``: the ready evaluation units first, then again after every trained unit, and at the end;
    ``--phase train`` never evaluates, ``--phase eval`` never trains."""
    calls: list[str] = []

    def fake_training(c: Campaign, paths: Paths, *, units: list[Any] | None = None, after_unit: Any = None,
                      **kw: Any) -> list[str]:
        for u in units or []:
            calls.append(f"train {u.id}")
            if after_unit is not None:
                after_unit(u)
        return [u.id for u in units or []]

    monkeypatch.setattr(cp, "run_training", fake_training)
    monkeypatch.setattr(cp, "run_evaluations", lambda c, paths, **kw: calls.append("eval") or [])
    monkeypatch.setitem(cp.CAMPAIGNS, "tiny", TINY)
    args = ["tiny", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--nice", "0",
            "--units", "baseline-s0,gal-s0"]
    assert cp.main([*args, "--phase", "all"]) == 0
    assert calls == ["eval", "train baseline-s0", "eval", "train gal-s0", "eval", "eval"]
    calls.clear()
    cp.main([*args, "--phase", "train"])
    assert calls == ["train baseline-s0", "train gal-s0"]
    calls.clear()
    cp.main([*args, "--phase", "eval"])
    assert calls == ["eval"]


def test_cldl_table8_is_table_four_on_fashion_mnist() -> None:
    """Campaign 3: Table VIII's rows with the LSD Fashion-MNIST recipe, every unit alike, PROTOCOL's F-MNIST ε."""
    c = cp.get_campaign("cldl-table8")
    units = train_units(c)
    assert len(units) == 6 * 3 + 2 + 3
    assert all(u.spec["dataset"] == "fashion_mnist" and u.spec["epochs"] == 30 and u.spec["extra_pass"]
               and u.spec["schedule"] == {"name": "multistep", "milestones": [10, 20], "gamma": 0.1}
               for u in units)
    assert {r.paper_column for r in c.rows} - {None} == set(c.paper["columns"])
    assert c.paper["eps"] == [0.08, 0.1, 0.15, 0.2] and c.paper["headline_eps"] in c.paper["eps"]
    by_id = {u.id: u for u in units}
    assert by_id["cldl-3-2-4-s0"].spec["hyperparameters"] == {"gamma": 3.0, "alpha": 2.0, "beta": 4.0}
    assert list(cp.CAMPAIGNS) == ["cldl-table4", "dkd-table3", "cldl-table8"]  # the order


def _spec_table(text: str, title: str) -> dict[str, dict[str, list[float]]]:
    """A reference table of the CLDL spec as {column: {family: [value per ε]}} (bold marks dropped)."""
    lines = text[text.index(title):].splitlines()[2:]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    out: dict[str, dict[str, list[float]]] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [x.strip().strip("*") for x in line.strip("|").split("|")]
        for col, val in zip(head[2:], cells[2:], strict=True):
            out.setdefault(col, {}).setdefault(cells[0], []).append(float(val))
    return out


@pytest.mark.skipif(not (Path(__file__).resolve().parents[3] / "shared" / "specs" / "cldl.md").exists(),
                    reason="the method specs (../shared) are not beside this checkout")
def test_the_declared_paper_figures_are_the_specs_tables() -> None:
    """Tables IV and VIII as declared equal the spec's transcription of the paper (where the spec is at hand)."""
    text = (Path(__file__).resolve().parents[3] / "shared" / "specs" / "cldl.md").read_text()
    t8 = _spec_table(text, "#### Table VIII")
    assert t8 == cp.get_campaign("cldl-table8").paper["columns"]
    t4 = _spec_table(text, "#### Table IV")
    declared = cp.get_campaign("cldl-table4").paper["columns"]  # plus Table VI's CLDL(3,0,0), not in Table IV
    assert len(t4) == 6 and t4 == {k: declared[k] for k in t4}
