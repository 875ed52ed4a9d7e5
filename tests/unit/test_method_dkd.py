"""DKD (spec dkd.md): loss values by hand, gradient flow, stages and resume, votes, LSS, validation.

The six unit tests the spec lists (§2.9) are marked ``spec §2.9.<n>`` in their docstrings.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from ensemble_core.checkpoint import load_ensemble
from ensemble_core.ensemble import combine_rule
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.dkd import (
    DKD,
    boosted_vote,
    dkd_objective,
    hard_margin_svm,
    latent_cosine,
    latent_space_separation,
    majority_vote,
    vote_statistics,
)
from ensemble_core.models import build_model
from ensemble_core.spec import TrainSpec
from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble, train_local

torch.set_num_threads(1)


def make_method(members: int = 3, dataset: str = "mnist", **hp: Any) -> DKD:
    m = get_method("dkd").from_spec_dict(hp, members=members, num_classes=10, dataset=dataset,
                                         architecture="lenet5")
    assert isinstance(m, DKD)
    return m


def make_net(members: int = 3, stage: int = 2, arch: str = "lenet5", **hp: Any) -> TrainNet:
    method = make_method(members, **hp)
    nets = []
    for k in range(members):
        torch.manual_seed(100 + k)
        nets.append(build_model(arch))
    net = TrainNet(nets, {}, method)
    net.set_stage(method.stages()[stage])
    return net


def ctx_for(n: int, stage: int = 2) -> StepContext:
    return StepContext(0, 0, stage, 0, 1, n, 0, torch.Generator().manual_seed(0), torch.device("cpu"))


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------ loss values


def test_loss_by_hand_on_tiny_tensors() -> None:
    """(1-ζ)·CE + ζ·mean_p cos_p (Eq. 4) on two samples, three classes, two predecessors."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    e = math.e
    ce = (-math.log(e**2 / (e**2 + 2)) - math.log(1 / (e + 2))) / 2
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    pred_a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # cos: 1 and 1/√2
    pred_b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # cos: 0 (orthogonal) and 0 (zero vector)
    cos_a, cos_b = (1 + 1 / math.sqrt(2)) / 2, 0.0
    zeta = 0.9
    loss, terms = dkd_objective(logits, y, [student], [[pred_a], [pred_b]], zeta)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["cos_0"].item() == pytest.approx(cos_a, rel=1e-6)
    assert terms["cos_1"].item() == pytest.approx(cos_b, abs=1e-7)
    # ζ/i with i = 2 predecessors on each term
    assert loss.item() == pytest.approx((1 - zeta) * ce + zeta / 2 * cos_a + zeta / 2 * cos_b, rel=1e-6)
    # one predecessor: Eq. 3
    loss1, _ = dkd_objective(logits, y, [student], [[pred_a]], 0.5)
    assert loss1.item() == pytest.approx(0.5 * ce + 0.5 * cos_a, rel=1e-6)
    # no predecessor: Eq. 1, plain CE whatever ζ
    loss0, terms0 = dkd_objective(logits, y, [student], [], 0.9)
    assert loss0.item() == pytest.approx(ce, rel=1e-6) and set(terms0) == {"ce"}


def test_two_latent_layers_average_their_cosines() -> None:
    logits, y = torch.zeros(1, 2), torch.tensor([0])
    s1, s2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    p1, p2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])  # cos 1 and 1/√2
    _, terms = dkd_objective(logits, y, [s1, s2], [[p1, p2]], 0.5)
    assert terms["cos"].item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2, rel=1e-6)


def test_abs_cos_ablation() -> None:
    s, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    assert latent_cosine(s, p).item() == pytest.approx(-1.0)
    assert latent_cosine(s, p, abs_cos=True).item() == pytest.approx(1.0)


def test_zeta_zero_is_plain_cross_entropy() -> None:
    """spec §2.9.1: with ζ = 0 a DKD member's loss equals plain CE."""
    net = make_net(zeta=0.0)
    x, y = batch()
    out = net(x, y, ctx_for(len(x)))
    expected = F.cross_entropy(net.members[2](x), y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.terms["cos"].item() > 0  # the term is still computed and logged


@pytest.mark.parametrize("n_pred", [1, 2, 3, 4])
def test_diversity_weights_add_up_to_zeta(n_pred: int) -> None:
    """spec §2.9.2: with the same cosine c to every predecessor the diversity part is ζ·c for every i."""
    c, zeta = 0.3, 0.7
    logits, y = torch.zeros(2, 4), torch.tensor([1, 3])  # CE = log 4
    student = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    pred = torch.tensor([[c, math.sqrt(1 - c * c)], [5 * c, 5 * math.sqrt(1 - c * c)]])
    loss, terms = dkd_objective(logits, y, [student], [[pred]] * n_pred, zeta)
    assert terms["cos"].item() == pytest.approx(c, rel=1e-6)
    assert loss.item() == pytest.approx((1 - zeta) * math.log(4) + zeta * c, rel=1e-6)


def test_cosine_of_identical_models_is_one_and_disjoint_supports_zero() -> None:
    """spec §2.9.4: identical models give cosine 1; features with disjoint supports give 0."""
    net = make_net(members=2, stage=1)
    net.members[1].load_state_dict(net.members[0].state_dict())  # the student is a copy of M
    x, y = batch(16)
    out = net(x, y, ctx_for(16, 1))
    assert out.terms["cos"].item() == pytest.approx(1.0, abs=1e-5)
    a = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 4.0, 1.0], [5.0, 0.0, 0.0, 2.0]])
    assert latent_cosine(a, b).tolist() == [0.0, 0.0]
    assert latent_cosine(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_module_loss_matches_objective_on_member_features() -> None:
    """``DKD.loss`` feeds the right tensors: the penultimate features of the student and of every frozen
    predecessor."""
    net = make_net(zeta=0.6)
    x, y = batch()
    out = net(x, y, ctx_for(len(x)))
    parts = [m.forward_parts(x) for m in net.members]
    cos = [F.cosine_similarity(parts[2].features, parts[p].features, dim=1).mean() for p in (0, 1)]
    expected = 0.4 * F.cross_entropy(parts[2].logits, y) + 0.6 * (cos[0] + cos[1]) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.terms) == {"ce", "cos", "cos_0", "cos_1", "dead"}
    assert out.terms["cos_1"].item() == pytest.approx(cos[1].item(), rel=1e-5)


# ---------------------------------------------------------------------------- gradient flow


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs, strict=True)}


def test_which_parameters_each_term_reaches() -> None:
    """CE reaches every student parameter; the cosine on the penultimate features reaches the body but not
    the classifier; predecessors take no part in autograd at all."""
    net = make_net(zeta=0.5)
    x, y = batch()
    out = net(x, y, ctx_for(len(x)))
    student = net.members[2]
    ce_g = _grads(out.terms["ce"], student)
    cos_g = _grads(out.terms["cos"], student)
    assert all(g is not None and g.abs().sum() > 0 for g in ce_g.values())
    assert cos_g["classifier.weight"] is None and cos_g["classifier.bias"] is None
    for name in ("conv1.weight", "fc1.weight", "rep.weight", "rep.bias"):
        assert cos_g[name] is not None and cos_g[name].abs().sum() > 0, name
    for p in itertools.chain(net.members[0].parameters(), net.members[1].parameters()):
        assert not p.requires_grad
    # the total's gradient is (1-ζ)·∇CE + ζ·∇cos
    tot_g = _grads(out.loss, student)
    expected = 0.5 * ce_g["rep.weight"] + 0.5 * cos_g["rep.weight"]
    assert torch.allclose(tot_g["rep.weight"], expected, atol=1e-7)


def test_stage_zero_trains_main_with_ce_only() -> None:
    net = make_net(stage=0, zeta=0.9)
    x, y = batch()
    out = net(x, y, ctx_for(len(x), 0))
    assert out.loss.item() == pytest.approx(F.cross_entropy(net.members[0](x), y).item(), rel=1e-6)
    assert not any(p.requires_grad for m in net.members[1:] for p in m.parameters())
    assert all(p.requires_grad for p in net.members[0].parameters())


def test_backward_leaves_predecessors_without_grad_and_unchanged() -> None:
    """spec §2.9.3 (one step): after backward and an optimizer step every predecessor has ``.grad is None``
    and its state_dict is bit-identical; frozen members are in eval mode, the student in train mode."""
    net = make_net()
    before = [copy.deepcopy(m.state_dict()) for m in net.members[:2]]
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    x, y = batch()
    out = net(x, y, ctx_for(len(x)))
    out.loss.backward()
    opt.step()
    assert not net.members[0].training and not net.members[1].training and net.members[2].training
    for m, sd in zip(net.members[:2], before, strict=True):
        assert all(p.grad is None for p in m.parameters())
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert all(p.grad is not None for p in net.members[2].parameters())


# ------------------------------------------------------------------------ stages and resume

SPEC: dict[str, Any] = {"method": "dkd", "dataset": "synthetic", "architecture": "lenet5", "members": 3,
                        "epochs": 2, "batch_size": 64, "train_subset": 192, "eval_subset": 256,
                        "hyperparameters": {"lss_samples": 128}}


def test_stages_one_per_member_with_earlier_members_frozen() -> None:
    stages = make_method(4).stages()
    assert [s.name for s in stages] == ["M", "A1", "A2", "A3"]
    assert [s.train_members for s in stages] == [(0,), (1,), (2,), (3,)]
    assert [s.frozen_members for s in stages] == [(), (0,), (0, 1), (0, 1, 2)]
    assert not any(s.train_aux for s in stages)


def _snap(state: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in sd.items()} for sd in state["members"]]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_each_member_frozen_after_its_stage_over_whole_epochs() -> None:
    """spec §2.9.3 (whole epochs): a member's weights never change after its stage ends."""
    states: list[tuple[int, int, list[dict[str, torch.Tensor]]]] = []
    result = train_ensemble(SPEC, hooks=TrainHooks(
        on_epoch_end=lambda m, s: states.append((m["stage"], m["epoch"], _snap(s))), log=lambda s: None))
    assert [(s, e) for s, e, _ in states] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    final = result.state["members"]
    end_of = {s: snap for s, e, snap in states if e == 2}
    assert _same(end_of[0][0], final[0]) and _same(end_of[1][1], final[1])
    # later members did train, from their own initialisation (not a copy of M)
    assert not _same(states[0][2][1], final[1]) and not _same(final[0], final[1])
    h = result.history
    assert "train_cos" not in h[0] and "train_cos_0" in h[2] and "train_cos_1" in h[4]
    assert [m["stage_name"] for m in h] == ["M", "M", "A1", "A1", "A2", "A2"]


@pytest.mark.slow
def test_resume_mid_stage_does_not_retrain_a_finished_member() -> None:
    """Interrupt in the middle of stage A1, resume: M is never touched again, no epoch of M runs again,
    and the final weights equal an uninterrupted run's."""
    full = train_ensemble(SPEC, hooks=TrainHooks(log=lambda s: None))
    saved: dict[str, Any] = {}
    flag = {"stop": False}

    def log(msg: str) -> None:
        flag["stop"] = msg.startswith("stage 2 epoch 1 ")  # after A1's first epoch

    def on_end(m: dict[str, Any], s: dict[str, Any] | None) -> None:
        saved["state"] = s

    with pytest.raises(TrainingStopped):
        train_ensemble(SPEC, hooks=TrainHooks(on_epoch_end=on_end, should_stop=lambda: flag["stop"], log=log))
    state = saved["state"]
    assert state["progress"] == {"stage": 1, "epoch": 1, "finished": False, "stages": 3, "epochs": 2}
    m0_at_stop = _snap(state)[0]
    lines: list[str] = []
    resumed = train_ensemble(SPEC, resume_state=state, hooks=TrainHooks(log=lines.append))
    assert lines[0].startswith("resuming at stage 2/3, epoch 2/2")
    assert not any(line.startswith("stage 1 epoch") for line in lines)  # M's stage is not run again
    epochs_run = [line.split(" |")[0] for line in lines[1:]]
    assert epochs_run == ["stage 2 epoch 2", "stage 3 epoch 1", "stage 3 epoch 2"]
    assert _same(m0_at_stop, resumed.state["members"][0])
    for a, b in zip(full.state["members"], resumed.state["members"], strict=True):
        assert _same(a, b)
    expected = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert [(m["stage"], m["epoch"]) for m in resumed.history] == expected


@pytest.mark.slow
def test_train_local_writes_loadable_ensemble_with_results(tmp_path: Any, capsys: Any) -> None:
    result, path = train_local(SPEC, tmp_path, progress=False, log=lambda s: None)
    ens = load_ensemble(path)
    assert ens.combine == "boosted_vote_aux" and len(ens) == 3
    r = json.loads((tmp_path / "results.json").read_text())
    mr = r["method_results"]
    assert mr["zeta"] == 0.9 and mr["zeta_source"].startswith("spec §4")
    assert mr["deployed_combine"] == "boosted_vote_aux" and mr["n"] == 256
    assert set(mr["vote"]) == {"all_members", "auxiliaries"} and mr["vote"]["auxiliaries"]["voters"] == 2
    assert mr["deployed_voters"] == 2  # SPEC sets 3 members: the ablation with two (unanimous) voters
    assert set(mr["lss"]["features"]["pairs"]) == {"0-1", "0-2", "1-2"}
    assert mr["lss"]["features"]["n_samples"] == 128 and len(mr["lss"]["features"]["one_vs_rest"]) == 3
    assert len(mr["latent_cosine"]) == 3 and mr["latent_cosine"][0][0] == pytest.approx(1.0, abs=1e-5)
    # the stored results agree with the loaded ensemble's deployed rule on the same subset
    from ensemble_core.data import load_dataset, test_subset

    test = test_subset(load_dataset("synthetic", "test"), "report", n=256)
    x, y = test.as_float()
    pred = ens.predict(x)
    assert r["metrics"]["test_clean_acc"] == pytest.approx((pred == y).float().mean().item())
    assert mr["vote"]["auxiliaries"]["boosted_acc"] == pytest.approx((pred == y).float().mean().item())
    z = ens.member_logits(x)
    assert torch.equal(pred, boosted_vote(z[1:], 2))
    assert mr["vote"]["all_members"]["failed_majorities"] == int((majority_vote(z) < 0).sum())
    # the command-line diagnostics give the same numbers for the stored ensemble
    from ensemble_core.methods.dkd import main

    capsys.readouterr()
    assert main([str(path), "--n", "256"]) == 0
    cli = json.loads(capsys.readouterr().out)[str(path)]
    assert cli["vote"] == mr["vote"] and cli["method"] == "dkd" and cli["combine"] == "boosted_vote_aux"
    assert cli["lss"]["features"]["total"] > 0
    # transfer FGSM from an ensemble onto itself at eps 0 leaves the clean statistics
    assert main([str(path), "--n", "256", "--transfer-from", str(path), "--fgsm-eps", "0.0", "0.3"]) == 0
    tr = json.loads(capsys.readouterr().out)[str(path)]["transfer_fgsm"]
    assert tr["0.0"]["auxiliaries"] == mr["vote"]["auxiliaries"]
    assert tr["0.0"]["deployed_acc"] == pytest.approx(mr["vote"]["auxiliaries"]["boosted_acc"])
    assert set(tr["0.3"]) == {"all_members", "auxiliaries", "deployed_acc"}


# ---------------------------------------------------------------------------------- voting


def _logits_from_rankings(rankings: list[list[list[int]]], probs: list[list[list[float]]] | None = None,
                          c: int = 6) -> torch.Tensor:
    """(K, N, C) logits whose per-member class order starts with the given classes."""
    k, n = len(rankings), len(rankings[0])
    z = torch.full((k, n, c), -5.0)
    for i, j in itertools.product(range(k), range(n)):
        for r, cls in enumerate(rankings[i][j]):
            z[i, j, cls] = (probs[i][j][r] if probs else 0.0) + 3.0 - r
    return z


def test_vote_worked_examples_of_the_spec() -> None:
    """spec §2.9.5 / §3.3 (K = 3, n = 2, classes a..f = 0..5)."""
    a, b, c, d, e, f = range(6)
    # sample 0: top-1 (a, a, b) -> a, a regular majority (not failed)
    # sample 1: top-1 (a, b, c), top-2 {a,b}, {b,c}, {c,d}: b and c have 2 votes -> summed probability
    # sample 2: top-2 {a,b}, {c,d}, {e,f}: a boosted failed majority (wrong)
    rankings = [[[a, c], [a, b], [a, b]], [[a, b], [b, c], [c, d]], [[b, a], [c, d], [e, f]]]
    labels = torch.tensor([a, c, e])
    z = _logits_from_rankings(rankings)
    assert majority_vote(z).tolist() == [a, -1, -1]
    # member 2 much surer of c than member 0 of b: c's summed probability is larger
    z_c = z.clone()
    z_c[2, 1, c] = 8.0
    assert boosted_vote(z_c, 2).tolist() == [a, c, -1]
    # the other way round: b wins
    z_b = z.clone()
    z_b[1, 1, b] = 8.0
    assert boosted_vote(z_b, 2).tolist() == [a, b, -1]
    pb, pc = z_b.softmax(-1).sum(0)[1, [b, c]].tolist()
    assert pb > pc
    stats = vote_statistics(z_c, labels, 2)
    assert stats["failed_majorities"] == 2 and stats["boosted_failed_majorities"] == 1
    assert stats["majority_acc"] == pytest.approx(1 / 3) and stats["boosted_acc"] == pytest.approx(2 / 3)
    assert stats["voters"] == 3


def test_boosted_vote_prefers_more_votes_and_uses_top_n() -> None:
    a, b, c, d = range(4)
    # top-1 (a, b, c); top-2 {a,b}, {b,c}, {c,b}: b in all three top-2 sets, c in two -> b
    z = _logits_from_rankings([[[a, b]], [[b, c]], [[c, b]]], c=4)
    assert boosted_vote(z, 2).tolist() == [b]
    # top-3 rescues a sample top-2 cannot: {a,b,d}, {c,d,a}, {b,c,?}
    z = _logits_from_rankings([[[a, b, d]], [[c, d, a]], [[b, c, a]]], c=4)
    assert majority_vote(z).tolist() == [-1]
    # top-2 {a,b}, {c,d}, {b,c}: b (members 0, 2) and c (members 1, 2) tie; equal summed probability
    # by symmetry, so the lower index wins the argmax; either way it is not a failure
    assert boosted_vote(z, 2).item() in (b, c)
    assert boosted_vote(z, 3).item() == a  # a is in all three top-3 sets


def test_registered_rules_and_their_attack_surrogates() -> None:
    z = _logits_from_rankings([[[0, 1]], [[1, 2]], [[2, 1]], [[2, 0]]], c=3)  # 4 members
    for name, surrogate in [("boosted_vote", "log_mean_probs"), ("boosted_vote_aux", "log_mean_probs_aux"),
                            ("boosted_vote_top3", "log_mean_probs"), ("vote_aux", "log_mean_probs_aux"),
                            ("boosted_vote_aux_top3", "log_mean_probs_aux")]:
        rule = combine_rule(name)
        assert not rule.differentiable and rule.attack_surrogate == surrogate
        assert rule.scores(z).shape == (1, 3)
    assert combine_rule("boosted_vote").predict_labels(z).tolist() == [boosted_vote(z, 2).item()]
    # the auxiliary-only rules ignore member 0 (DKD's M) completely
    z_other = z.clone()
    z_other[0] = torch.tensor([[0.0, 0.0, 50.0]])
    for name in ("boosted_vote_aux", "vote_aux", "log_mean_probs_aux", "boosted_vote_aux_top3"):
        rule = combine_rule(name)
        assert torch.equal(rule.predict_labels(z), rule.predict_labels(z_other))
        assert torch.allclose(rule.scores(z), rule.scores(z_other))
    assert combine_rule("vote_aux").predict_labels(z).tolist() == [2]  # members 1..3 vote (1, 2, 2)
    expected = torch.log(z[1:].softmax(-1).mean(0))
    assert torch.allclose(combine_rule("log_mean_probs_aux").scores(z), expected, atol=1e-6)
    # with M alone (the first stage's monitoring) the auxiliary rule falls back on M
    assert combine_rule("boosted_vote_aux").predict_labels(z[:1]).tolist() == [0]
    # scores: argmax agrees with the prediction wherever there is one
    zz = torch.randn(3, 200, 10, generator=torch.Generator().manual_seed(0))
    pred = boosted_vote(zz, 2)
    ok = pred >= 0
    assert torch.equal(combine_rule("boosted_vote").scores(zz).argmax(1)[ok], pred[ok])


def test_default_combine_follows_hyperparameters() -> None:
    assert make_method().combine() == "boosted_vote_aux"
    assert make_method(include_main_in_vote=True).combine() == "boosted_vote"
    assert make_method(top_n=3).combine() == "boosted_vote_aux_top3"
    assert make_method(include_main_in_vote=True, top_n=3).combine() == "boosted_vote_top3"


# -------------------------------------------------------------------------------------- LSS


def test_lss_of_clouds_separated_by_a_known_gap() -> None:
    """spec §2.9.6: x1 ≥ g/2 vs x1 ≤ -g/2 with points on both planes gives 2/‖w‖ = g; overlap gives 0."""
    rng = np.random.default_rng(0)
    for g in (0.2, 1.0, 3.0):
        pos = rng.uniform(-1, 1, (150, 6))
        neg = rng.uniform(-1, 1, (150, 6))
        pos[:, 0] = g / 2 + rng.uniform(0, 2, 150)
        neg[:, 0] = -g / 2 - rng.uniform(0, 2, 150)
        pos[:3, 0] = g / 2  # three points on each boundary plane, facing each other
        neg[:3, 0] = -g / 2
        neg[:3, 1:] = pos[:3, 1:]
        r = hard_margin_svm(pos, neg)
        assert r["separable"] and r["lss"] == pytest.approx(g, rel=1e-4)
    mixed = rng.normal(size=(400, 6))
    r = hard_margin_svm(mixed[:200], mixed[200:])
    assert r == {"lss": 0.0, "separable": False, "n_pos": 200, "n_neg": 200}


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip((p - a) @ ab / (ab @ ab), 0, 1))
    return float(np.linalg.norm(p - (a + t * ab)))


def test_lss_equals_the_distance_between_convex_hulls_in_2d() -> None:
    """The hard-margin width is the distance between the two clouds' convex hulls: brute force in 2-D."""
    rng = np.random.default_rng(1)
    for trial in range(5):
        pos = rng.normal(size=(7, 2)) + np.array([2.5, 1.0 + trial])
        neg = rng.normal(size=(7, 2)) * 0.7
        brute = min(min(_segment_distance(p, a, b) for p in pos for a in neg for b in neg),
                    min(_segment_distance(p, a, b) for p in neg for a in pos for b in pos))
        r = hard_margin_svm(pos, neg)
        assert r["separable"] and r["lss"] == pytest.approx(brute, rel=1e-4)


def test_lss_scales_with_the_features_and_is_unchanged_by_translation() -> None:
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(size=(50, 4)) + 3, rng.normal(size=(50, 4)) - 3
    base = hard_margin_svm(pos, neg)["lss"]
    assert hard_margin_svm(10 * pos, 10 * neg)["lss"] == pytest.approx(10 * base, rel=1e-4)
    assert hard_margin_svm(pos + 7, neg + 7)["lss"] == pytest.approx(base, rel=1e-4)


def test_ensemble_lss_is_the_mean_of_one_vs_rest_margins() -> None:
    """Eq. 6 on three clouds on a line at 0, 1 and 3: one-vs-rest margins are 1, 0 (1 is between the
    others: not separable) and 2."""
    clouds = [np.array([[0.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 1.0]]),
              np.array([[3.0, 0.0], [3.0, 1.0]])]
    r = latent_space_separation(clouds)
    assert [p["lss"] for p in r["pairs"].values()] == pytest.approx([1.0, 3.0, 2.0], rel=1e-4)
    assert [p["lss"] for p in r["one_vs_rest"]] == pytest.approx([1.0, 0.0, 2.0], abs=1e-4)
    assert r["one_vs_rest"][1]["separable"] is False
    assert r["total"] == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------- hyperparameters, validation


def test_zeta_defaults_per_data_set_and_override() -> None:
    assert make_method(dataset="mnist").zeta == 0.9
    assert make_method(dataset="fashion_mnist").zeta == 0.9
    assert make_method(dataset="cifar10").zeta == 0.5
    assert make_method(dataset="cifar10", zeta=0.2).zeta == 0.2


@pytest.mark.parametrize(("hp", "field"), [({"zeta": 1.0}, "zeta"), ({"zeta": -0.1}, "zeta"),
                                           ({"latent": ["logits"]}, "latent"), ({"latent": []}, "latent"),
                                           ({"latent": ["rep", "rep"]}, "latent"), ({"top_n": 4}, "top_n"),
                                           ({"lss_samples": -1}, "lss_samples"), ({"eta": 1}, "eta")])
def test_bad_hyperparameters_are_located_by_field(hp: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        TrainSpec.model_validate({"method": "dkd", "hyperparameters": hp})
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert any(loc.startswith(f"hyperparameters.{field}") for loc in locs), locs


def test_member_count_constraint_and_resolved_spec() -> None:
    with pytest.raises(ValidationError, match="at least 2 members"):
        TrainSpec.model_validate({"method": "dkd", "members": 1})
    spec = TrainSpec.model_validate({"method": "dkd", "members": 2, "hyperparameters": {"latent": ["rep"]}})
    assert spec.hyperparameters == {"zeta": None, "latent": ["rep"], "abs_cos": False,
                                    "include_main_in_vote": False, "top_n": 2, "objective": "dkd",
                                    "kd_temperature": 1.0, "lss_samples": 2000}


def test_described_for_get_v1_methods() -> None:
    (d,) = [m for m in describe_methods() if m["name"] == "dkd"]
    assert d["default_combine"] == "boosted_vote_aux" and d["min_members"] == 2 and d["default_members"] == 4
    assert set(d["hyperparameters"]) == {"zeta", "latent", "abs_cos", "include_main_in_vote", "top_n",
                                         "objective", "kd_temperature", "lss_samples"}
    assert all(v["description"] for v in d["hyperparameters"].values())
    assert "0.9" in d["hyperparameters"]["zeta"]["description"]


def test_rep_latent_is_selectable_and_reaches_the_rep_layer() -> None:
    net = make_net(latent=["rep"], zeta=0.5)
    x, y = batch()
    out = net(x, y, ctx_for(len(x)))
    parts = [m.forward_parts(x) for m in net.members]
    cos = [F.cosine_similarity(parts[2].rep, parts[p].rep, dim=1).mean() for p in (0, 1)]
    assert out.terms["cos"].item() == pytest.approx(((cos[0] + cos[1]) / 2).item(), rel=1e-5)
    g = _grads(out.terms["cos"], net.members[2])
    assert g["rep.weight"] is not None and g["classifier.weight"] is None


def test_table_one_architectures_have_the_spec_parameter_counts() -> None:
    """spec §5.1: the MNIST net has 312,202 parameters, the CIFAR-10 net 1,406,794; latents 200-d / 192-d."""
    mn = build_model("dkd_mnist")
    cf = build_model("dkd_cifar10", in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert sum(p.numel() for p in mn.parameters()) == 312_202
    assert sum(p.numel() for p in cf.parameters()) == 1_406_794
    assert mn.forward_parts(torch.rand(2, 1, 28, 28)).features.shape == (2, 200)
    assert (mn.forward_parts(torch.rand(2, 1, 28, 28)).features >= 0).all()
    assert cf.forward_parts(torch.rand(2, 3, 32, 32)).features.shape == (2, 192)
    # DKD runs on the Table I net as on any registered one
    net = make_net(members=2, stage=1, arch="dkd_mnist")
    x, y = batch(4)
    out = net(x, y, ctx_for(4, 1))
    assert torch.isfinite(out.loss) and 0 <= out.terms["cos"].item() <= 1


# -------------------------------------------------------------------------------------- DDP

_DDP_WORKER = r"""
import sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ensemble_core.training import TrainHooks, train_ensemble
rank, store, out, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], __import__("json").loads(sys.argv[4])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
wrapped = []
def wrap(net, find_unused):
    wrapped.append(find_unused)
    return DDP(net, find_unused_parameters=find_unused)
res = train_ensemble(spec, rank=rank, world_size=2, hooks=TrainHooks(wrap=wrap, log=lambda s: None))
if rank == 0:
    torch.save({"members": res.state["members"], "wraps": len(wrapped)}, out)
dist.destroy_process_group()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_all_stages_under_ddp_match_one_process(tmp_path: Any) -> None:
    """Two gloo ranks, each with half of every global batch and DDP re-wrapping the TrainNet per stage
    (frozen predecessors excluded from DDP by ``requires_grad=False``), end with the weights of one process
    on the whole batches, to float tolerance."""
    import os
    import subprocess
    import sys

    # SGD: an update linear in the gradient (Adam divides float noise in near-zero gradients by itself)
    spec = {**SPEC, "epochs": 1, "train_subset": 128, "hyperparameters": {"lss_samples": 0},
            "optimizer": {"name": "sgd", "lr": 0.05}}
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_WORKER, str(r), str(tmp_path / "store"), str(out),
                               json.dumps(spec)], env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ddp = torch.load(out, weights_only=True)
    assert ddp["wraps"] == 3  # one DDP wrapper per stage
    single = train_ensemble(spec, hooks=TrainHooks(log=lambda s: None))
    for a, b in zip(single.state["members"], ddp["members"], strict=True):
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
