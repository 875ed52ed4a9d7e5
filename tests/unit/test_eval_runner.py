"""The evaluation runner on a small synthetic problem: per-example worst case, deployed-rule scoring,
resumable state, shard equivalence, records and artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble_core.data import DatasetInfo, TensorDataset, synthetic_dataset
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation import EvalState, EvaluationStopped, compute, prepare_plan, run_evaluation
from ensemble_core.evaluation.records import summarize
from ensemble_core.evaluation.state import column as _col

torch.set_num_threads(1)
INFO = DatasetInfo("synthetic", 10, 1, 8, (0.5,), (0.25,), False)


def _data(n: int, seed: int) -> TensorDataset:
    ds = synthetic_dataset(n=n, seed=seed, size=8)
    return TensorDataset(ds.images, ds.labels, INFO)


def _train_members(k: int, seed: int) -> list[nn.Module]:
    train = _data(800, seed=100 + seed)
    x, y = train.as_float()
    members = []
    for i in range(k):
        torch.manual_seed(seed * 10 + i)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        members.append(m.eval())
    return members


@pytest.fixture(scope="module")
def target() -> Ensemble:
    return Ensemble(_train_members(3, 0), "mean_logits").eval()


@pytest.fixture(scope="module")
def surrogate() -> Ensemble:
    return Ensemble(_train_members(2, 1), "log_mean_probs").eval()


@pytest.fixture(scope="module")
def test_set() -> TensorDataset:
    return _data(1200, seed=7)


def _spec(**kw: object) -> dict:
    spec = {"target_checkpoint": "in-memory", "n_examples": 60, "batch_size": 20, "split": "report",
            "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 10, "restarts": 2},
                        {"name": "fgsm", "eps": [0.1, 0.2, 0.3]}],
            "checks": {"n_examples": 20}}
    spec.update(kw)
    return spec


def test_clean_accuracy_and_records_shape(target: Ensemble, test_set: TensorDataset) -> None:
    r = run_evaluation(_spec(), target, test_set=test_set, log=lambda m: None)
    x, y = _data(1200, seed=7).as_float()
    plan = prepare_plan(_spec(), target, test_set=test_set)
    xs = x[torch.tensor(plan.indices)]
    expected = float((target.predict(xs) == y[torch.tensor(plan.indices)]).float().mean())
    assert r["clean"]["target"]["clean_acc"] == pytest.approx(expected)
    rec = [q for q in r["records"] if q["attack"] == "pgd-10x2" and q["eps"] == 0.1][0]
    for k in ("clean_acc", "robust_acc", "eps", "norm", "threat_model", "attack", "attack_params", "n_examples",
              "seed", "flags", "unreliable", "robust_acc_among_correct"):
        assert k in rec
    assert rec["n_examples"] == 60 and rec["norm"] == "Linf" and rec["attack_params"]["restarts"] == 2
    assert rec["attack_params"]["alpha"] == pytest.approx(0.025)
    assert rec["robust_acc_among_correct"] == pytest.approx(rec["n_robust"] / rec["n_clean_correct"])
    accs = [q["robust_acc"] for q in r["records"] if q["attack"] == "pgd-10x2"]
    assert accs == sorted(accs, reverse=True) and accs[-1] < 0.5 * rec["clean_acc"]


def test_worst_case_is_per_example_not_min_of_averages(target: Ensemble, test_set: TensorDataset) -> None:
    """Two attacks that fool disjoint halves: each leaves 50 %, the per-example worst case 0 %."""
    spec = _spec(attacks=[{"name": "pgd", "eps": [0.1], "steps": 5}, {"name": "fgsm", "eps": [0.1]}],
                 member_transfer=None, checks={"large_eps": None, "convergence": False, "n_examples": 20})
    plan = prepare_plan(spec, target, test_set=test_set)
    st = EvalState(plan.fingerprint, 0, plan.n)
    pos = range(plan.n)
    half = torch.arange(plan.n) < plan.n // 2
    st.set_bools(_col("target", "clean"), pos, torch.ones(plan.n, dtype=torch.bool))
    for k in ("randomized", "prob_outputs", "log_prob_outputs", "zero_grad|ce", "zero_grad|cw"):
        st.set_bools(f"target|{k}", pos, torch.zeros(plan.n, dtype=torch.bool))
    for i in range(3):
        st.set_bools(_col("target", "member_clean", i), pos, torch.ones(plan.n, dtype=torch.bool))
    st.set_bools(_col("target", "wb", 0, 0.1), pos, half)
    st.set_bools(_col("target", "wb", 1, 0.1), pos, ~half)
    r = summarize(plan, st)
    by = {q["attack"]: q["robust_acc"] for q in r["records"]}
    assert by["pgd-5"] == 0.5 and by["fgsm"] == 0.5
    assert by["worst case (Linf, all attacks)"] == 0.0


def test_smaller_eps_success_counts_at_larger_eps(target: Ensemble, test_set: TensorDataset) -> None:
    spec = _spec(attacks=[{"name": "pgd", "eps": [0.05], "steps": 5}, {"name": "fgsm", "eps": [0.2]}],
                 member_transfer=None, checks={"large_eps": None, "convergence": False, "n_examples": 20})
    plan = prepare_plan(spec, target, test_set=test_set)
    st = EvalState(plan.fingerprint, 0, plan.n)
    pos = range(plan.n)
    ones, zeros = torch.ones(plan.n, dtype=torch.bool), torch.zeros(plan.n, dtype=torch.bool)
    st.set_bools(_col("target", "clean"), pos, ones)
    for k in ("randomized", "prob_outputs", "log_prob_outputs", "zero_grad|ce", "zero_grad|cw"):
        st.set_bools(f"target|{k}", pos, zeros)
    for i in range(3):
        st.set_bools(_col("target", "member_clean", i), pos, ones)
    first = torch.arange(plan.n) < 10
    st.set_bools(_col("target", "wb", 0, 0.05), pos, ~first)  # PGD breaks 10 examples at 0.05
    st.set_bools(_col("target", "wb", 1, 0.2), pos, ones)  # FGSM breaks none at 0.2
    r = summarize(plan, st)
    wc = {q["eps"]: q["robust_acc"] for q in r["records"] if q["attack"].startswith("worst case")}
    assert wc == {0.05: pytest.approx(50 / 60), 0.2: pytest.approx(50 / 60)}


def test_vote_abstention_counts_wrong_and_attack_uses_surrogate(test_set: TensorDataset) -> None:
    members = _train_members(2, 3)
    ens = Ensemble(members, "vote").eval()  # 2 members: any disagreement is a failed majority
    r = run_evaluation(_spec(attacks=[{"name": "pgd", "eps": [0.1], "steps": 5}]), ens, test_set=test_set,
                       log=lambda m: None)
    plan = prepare_plan(_spec(), ens, test_set=test_set)
    x, y = test_set.as_float()
    idx = torch.tensor(plan.indices)
    pred = ens.predict(x[idx])
    assert r["clean"]["target"]["clean_acc"] == pytest.approx(float((pred == y[idx]).float().mean()))
    assert r["models"]["target"]["deployed_rule"] == "vote"
    assert r["models"]["target"]["attacked_rule"] == "log_mean_probs"
    rec = [q for q in r["records"] if q["attack"] == "pgd-5"][0]
    assert rec["deployed_rule"] == "vote" and rec["attacked_rule"] == "log_mean_probs"


def test_resume_after_stop_gives_the_same_state(target: Ensemble, surrogate: Ensemble, test_set: TensorDataset,
                                                tmp_path: Path) -> None:
    spec = _spec(transfer_attacks=[{"name": "pgd", "eps": [0.1], "steps": 5, "losses": ["ce", "cw"]}],
                 transfer_n_examples=80)
    plan = prepare_plan(spec, target, surrogates=[surrogate], test_set=test_set)
    full = compute(plan, log=lambda m: None)
    calls = {"n": 0}

    def stop_after_some() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    path = tmp_path / "state.json"
    with pytest.raises(EvaluationStopped):
        compute(plan, state_path=path, should_stop=stop_after_some, log=lambda m: None)
    saved = json.loads(path.read_text())
    assert 0 < len(saved["done"]) < len(full.done)
    logs: list[str] = []
    resumed = compute(plan, state_path=path, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert resumed.columns == full.columns
    assert resumed.floats == full.floats and resumed.done == full.done


def test_shards_merge_to_the_single_process_result(target: Ensemble, surrogate: Ensemble,
                                                    test_set: TensorDataset, tmp_path: Path) -> None:
    spec = _spec(transfer_attacks=[{"name": "fgsm", "eps": [0.1], "losses": ["ce", "cw"]}],
                 attacks=[{"name": "pgd", "eps": [0.1], "steps": 5, "restarts": 2},
                          {"name": "cw", "eps": [0.5, 1.0], "steps": 20}], transfer_n_examples=80)
    plan = prepare_plan(spec, target, surrogates=[surrogate], test_set=test_set)
    nb = len(plan.batches())
    assert nb == 4
    full = compute(plan, log=lambda m: None, cache_dir=tmp_path / "cache")
    shards = [compute(plan, batch_range=r, log=lambda m: None, cache_dir=tmp_path / "cache") for r in ((0, 1), (1, 4))]
    merged = EvalState.merge(shards)
    assert merged.columns == full.columns
    assert merged.floats == full.floats
    assert merged.counters == full.counters
    a, b = summarize(plan, full), summarize(plan, merged)
    assert a["records"] == b["records"] and a["flags"] == b["flags"]


def test_transfer_cache_reused_and_target_independent(target: Ensemble, surrogate: Ensemble,
                                                      test_set: TensorDataset, tmp_path: Path) -> None:
    spec = _spec(attacks=[], transfer_attacks=[{"name": "pgd", "eps": [0.1], "steps": 5}], member_transfer=None,
                 checks={"large_eps": None, "convergence": False, "n_examples": 20})
    cache = tmp_path / "cache"
    run_evaluation(spec, target, surrogates=[surrogate], test_set=test_set, cache_dir=cache, log=lambda m: None)
    files = sorted(p.name for p in cache.rglob("*.pt"))
    assert len(files) == 3  # one per batch of 20
    other = Ensemble(_train_members(3, 5), "mean_logits").eval()
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")}
    run_evaluation(spec, other, surrogates=[surrogate], test_set=test_set, cache_dir=cache, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")} == before  # read, never re-crafted


def test_another_code_version_crafts_the_same_transfer_examples(target: Ensemble, surrogate: Ensemble,
                                                                test_set: TensorDataset, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is keyed by the code version, the random starts are not: a refactor of the evaluation code
    (a new fingerprint) crafts bit-identical examples into new cache entries, so it can be checked to keep
    every number."""
    from ensemble_core.evaluation import runner

    spec = _spec(attacks=[], transfer_attacks=[{"name": "pgd", "eps": [0.1], "steps": 3, "restarts": 2}],
                 member_transfer=None, checks={"large_eps": None, "convergence": False, "n_examples": 20})
    first, second = tmp_path / "a", tmp_path / "b"
    run_evaluation(spec, target, surrogates=[surrogate], test_set=test_set, cache_dir=first, log=lambda m: None)
    monkeypatch.setattr(runner, "evaluation_code_fingerprint", lambda: "another-version!")
    run_evaluation(spec, target, surrogates=[surrogate], test_set=test_set, cache_dir=second, log=lambda m: None)
    a, b = sorted(first.rglob("*.pt")), sorted(second.rglob("*.pt"))
    assert a and len(a) == len(b) and {p.name for p in a}.isdisjoint(p.name for p in b)
    crafted_a = sorted(torch.load(p, weights_only=True).flatten().tolist() for p in a)
    crafted_b = sorted(torch.load(p, weights_only=True).flatten().tolist() for p in b)
    assert crafted_a == crafted_b
    moved = torch.load(a[0], weights_only=True)
    assert moved.abs().sum() > 0


def test_artifacts_and_valid_json(target: Ensemble, surrogate: Ensemble, test_set: TensorDataset,
                                  tmp_path: Path) -> None:
    spec = _spec(transfer_attacks=[{"name": "fgsm", "eps": [0.1, 0.2]}], transfer_n_examples=60)
    r = run_evaluation(spec, target, baseline=surrogate, surrogates=[surrogate], test_set=test_set,
                       out_dir=tmp_path, log=lambda m: None)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["records"] == json.loads(json.dumps(r["records"]))
    for name in ("robust_acc_vs_eps_Linf.png", "transfer_acc_vs_eps.png", "member_transfer_target.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert {t["name"] for t in r["tables"]} >= {"clean", "white_box_Linf", "transfer", "flags"}
    transfer = [t for t in r["tables"] if t["name"] == "transfer"][0]
    assert [row[0] for row in transfer["rows"]] == ["target", "baseline"]
    # the baseline is its own surrogate here, and the flag says so
    assert any(f["name"] == "surrogate_is_target" and f["model"] == "baseline" for f in r["flags"])
    assert all(math.isfinite(q["robust_acc"]) for q in r["records"])


# ------------------------------------------------------------------ reviewer-grade additions (issue #20)


def test_any_attack_groups_convergence_rows_and_code_version(target: Ensemble, surrogate: Ensemble,
                                                             test_set: TensorDataset) -> None:
    other = Ensemble(_train_members(2, 3), "mean_logits").eval()
    spec = _spec(transfer_attacks=[{"name": "pgd", "eps": [0.1, 0.25], "steps": 5, "restarts": 3,
                                    "losses": ["ce", "cw"]}], checks={"n_examples": 60})
    r = run_evaluation(spec, target, surrogates={"base": surrogate, "same": other},
                       surrogate_groups={"same": "same-method"}, test_set=test_set, log=lambda m: None)
    recs = [q for q in r["records"] if q["model"] == "target"]
    # transfer per group and over all; the all-surrogate row is the per-image worst case of the two groups
    for e in (0.1, 0.25):
        rows = {q["surrogate_group"]: q for q in recs if q["threat"] == "transfer" and q["eps"] == e
                and q["attack"].startswith("pgd")}
        assert set(rows) == {"all", "baseline", "same-method"}
        assert rows["all"]["robust_acc"] <= min(rows["baseline"]["robust_acc"], rows["same-method"]["robust_acc"])
        assert len(rows["all"]["components"]) == 4  # 2 surrogates x 2 losses
    # any attack: at every eps of either set, never above the white-box or the transfer worst case
    anyrows = {q["eps"]: q for q in recs if q["attack"] == "any attack (Linf)"}
    assert sorted(anyrows) == [0.1, 0.2, 0.25, 0.3]
    wb = {q["eps"]: q for q in recs if q["attack"] == "worst case (Linf, all attacks)"}
    tr = {q["eps"]: q for q in recs if q["attack"] == "worst case (transfer, Linf)" and q["surrogate_group"] == "all"}
    for e, q in anyrows.items():
        if e in wb:
            assert q["robust_acc"] <= wb[e]["robust_acc"] + 1e-12
        if e in tr:  # on the white-box images only, so compare counts, not rates
            assert q["n_robust"] <= tr[e]["n_robust"]
    # the convergence check at every eps, as records of their own that the worst case includes
    conv = {q["eps"]: q for q in recs if "convergence check" in q["attack"]}
    assert sorted(conv) == [0.1, 0.2, 0.3] and all(q["n_examples"] == 60 for q in conv.values())
    for e, q in conv.items():
        assert wb[e]["n_robust"] <= q["n_robust"]
    assert len(r["checks"]["target"]["convergence"]) == 3
    assert r["code_version"]["evaluation_code"] and len(r["code_version"]["evaluation_code"]) == 16
    assert r["surrogates"]["same"]["group"] == "same-method"
    assert r["surrogates"]["base"]["transfer_view"] == "log_mean_probs"


def test_transfer_is_crafted_on_the_surrogates_log_mean_probs(target: Ensemble, test_set: TensorDataset,
                                                              tmp_path: Path) -> None:
    """A mean-logits surrogate and the same members under log_mean_probs craft the very same examples (BIM: no
    random start, so the seeds, which depend on the surrogate's fingerprint, play no part)."""
    from ensemble_core.evaluation.runner import transfer_view

    members = _train_members(2, 5)
    a, b = Ensemble(members, "mean_logits").eval(), Ensemble(members, "log_mean_probs").eval()
    assert transfer_view(a).combine == "log_mean_probs" and transfer_view(b) is b
    spec = _spec(attacks=[{"name": "fgsm", "eps": [0.1]}], member_transfer=None,
                 transfer_attacks=[{"name": "bim", "eps": [0.2], "steps": 5, "losses": ["ce", "cw"]}])
    ra = run_evaluation(spec, target, surrogates={"s": a}, test_set=test_set, log=lambda m: None)
    rb = run_evaluation(spec, target, surrogates={"s": b}, test_set=test_set, log=lambda m: None)
    pick = [(q["attack"], q["eps"], q["n_robust"]) for q in ra["records"] if q["threat"] == "transfer"]
    assert pick == [(q["attack"], q["eps"], q["n_robust"]) for q in rb["records"] if q["threat"] == "transfer"]


def test_member_collapse_and_surrogate_flags_reach_the_target(surrogate: Ensemble, test_set: TensorDataset,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = _train_members(2, 0)
    dead = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        dead[1].weight.zero_()
        dead[1].bias.copy_(torch.arange(10.0))  # always class 9
    ens = Ensemble([*good, dead.eval()], "mean_logits").eval()
    r = run_evaluation(_spec(member_transfer=None), ens, test_set=test_set, log=lambda m: None)
    names = {f["name"] for f in r["flags"]}
    assert "member_collapse" in names
    f = next(f for f in r["flags"] if f["name"] == "member_collapse")
    assert f["details"]["member"] == 2 and all(q["unreliable"] for q in r["records"] if q["model"] == "target")

    # a surrogate whose attack returns non-finite examples (they are replaced by the clean input, never credited)
    from ensemble_core.evaluation import runner

    real = runner.run_attack
    monkeypatch.setattr(runner, "run_attack", lambda atk, x, y, seed: real(atk, x, y, seed) * float("nan"))
    healthy = Ensemble(_train_members(2, 0), "mean_logits").eval()
    spec = _spec(attacks=[{"name": "fgsm", "eps": [0.1]}], member_transfer=None,
                 transfer_attacks=[{"name": "pgd", "eps": [0.2], "steps": 2}])
    r = run_evaluation(spec, healthy, surrogates={"broken": surrogate}, test_set=test_set, log=lambda m: None)
    mine = [f for f in r["flags"] if f["name"] == "invalid_adversarial_examples" and f["model"] == "target"]
    assert mine and "surrogate 'broken'" in mine[0]["message"]
    tr = [q for q in r["records"] if q["model"] == "target" and q["threat"] == "transfer"
          and q["attack"].startswith("pgd")]
    assert tr and all(q["unreliable"] for q in tr)


def test_the_code_fingerprint_keys_the_state_and_the_transfer_cache(target: Ensemble, surrogate: Ensemble,
                                                                   test_set: TensorDataset, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ensemble_core.evaluation import runner
    from ensemble_core.spec import AttackSpec

    spec = _spec(attacks=[{"name": "fgsm", "eps": [0.1]}], member_transfer=None)
    p1 = prepare_plan(spec, target, test_set=test_set)
    key1 = runner.transfer_cache_key("fp", AttackSpec(name="pgd"), 0.1, "ce", 0, 0, "synthetic", [1, 2])
    seed_key1 = runner.transfer_cache_key("fp", AttackSpec(name="pgd"), 0.1, "ce", 0, 0, "synthetic", [1, 2],
                                          with_code=False)
    monkeypatch.setattr(runner, "evaluation_code_fingerprint", lambda: "another-version!")
    p2 = prepare_plan(spec, target, test_set=test_set)
    key2 = runner.transfer_cache_key("fp", AttackSpec(name="pgd"), 0.1, "ce", 0, 0, "synthetic", [1, 2])
    seed_key2 = runner.transfer_cache_key("fp", AttackSpec(name="pgd"), 0.1, "ce", 0, 0, "synthetic", [1, 2],
                                          with_code=False)
    assert p1.fingerprint != p2.fingerprint and key1 != key2
    # the random starts are seeded without the code version: a refactor keeps the numbers bit for bit
    assert seed_key1 == seed_key2 != key1
    # a state saved by the other code version is not reused: it is recomputed (and says so)
    state = tmp_path / "state.json"
    compute(p1, state_path=state, log=lambda m: None)
    seen: list[str] = []
    compute(p2, state_path=state, log=seen.append)
    assert any("ignor" in m or "another evaluation" in m for m in seen), seen
