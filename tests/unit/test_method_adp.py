"""ADP (ensemble_core/methods/adp.py): entropy and log-determinant by hand on chosen probability vectors,
the loss through the method, which parameters each term reaches, validation and ``describe()``."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ensemble_core.data import synthetic_dataset
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.adp import (
    ADPHyperparameters,
    adp_terms,
    ensemble_entropy,
    log_ensemble_diversity,
    non_maximal_predictions,
)
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.models import build_model
from ensemble_core.spec import TrainSpec

torch.set_num_threads(1)
DELTA = 1e-6


def probs(*rows: list[float]) -> torch.Tensor:
    """Members' probability vectors for one sample: ``(N, 1, C)``, float64."""
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(1)


def ctx(local: int, offset: int = 0, global_size: int | None = None) -> StepContext:
    return StepContext(0, 0, 0, 0, 1, global_size or local, offset, torch.Generator().manual_seed(0),
                       torch.device("cpu"))


def lenet_net(hp: dict, k: int = 2) -> TrainNet:
    members = []
    for i in range(k):
        torch.manual_seed(20 + i)
        members.append(build_model("lenet5"))
    return TrainNet(members, {}, get_method("adp").from_spec_dict(hp, members=k, num_classes=10,
                                                                   dataset="mnist", architecture="lenet5"))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = synthetic_dataset(n, seed=seed)
    return ds.images.float() / 255, ds.labels


def test_two_members_by_hand() -> None:
    """p1 = (.5, .3, .2), p2 = (.5, .2, .3), y = 0: non-true vectors (.3, .2), (.2, .3), cosine 12/13."""
    p = probs([0.5, 0.3, 0.2], [0.5, 0.2, 0.3])
    y = torch.tensor([0])
    m = non_maximal_predictions(p, y)
    assert m[0].tolist() == [pytest.approx([0.3 / math.sqrt(0.13), 0.2 / math.sqrt(0.13)]),
                             pytest.approx([0.2 / math.sqrt(0.13), 0.3 / math.sqrt(0.13)])]
    c = 12 / 13
    assert log_ensemble_diversity(p, y, DELTA).item() == pytest.approx(math.log((1 + DELTA) ** 2 - c * c), rel=1e-9)
    # mean prediction (.5, .25, .25): H = 1.5 ln 2
    assert ensemble_entropy(p).item() == pytest.approx(1.5 * math.log(2), rel=1e-9)
    # the whole objective from logits = log p: CE_i = ln 2 each, summed
    hp = ADPHyperparameters()
    loss, terms = adp_terms(list(torch.log(p.float())), y, hp)
    logdet = math.log((1 + DELTA) ** 2 - c * c)
    assert terms["ce"].item() == pytest.approx(2 * math.log(2), abs=1e-6)
    assert terms["log_det"].item() == pytest.approx(logdet, abs=1e-4)
    assert loss.item() == pytest.approx(2 * math.log(2) - 2.0 * 1.5 * math.log(2) - 0.5 * logdet, abs=1e-4)


def test_three_members_determinant_by_sarrus() -> None:
    rows = [[0.6, 0.2, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.1, 0.6, 0.1]]
    y = torch.tensor([3])  # the true class is the last one: non-true vectors are the first three entries

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(t * t for t in v))
        return [t / n for t in v]

    u = [unit(r[:3]) for r in rows]
    g = [[sum(a * b for a, b in zip(u[i], u[j], strict=True)) + (DELTA if i == j else 0.0) for j in range(3)]
         for i in range(3)]
    det = (g[0][0] * g[1][1] * g[2][2] + g[0][1] * g[1][2] * g[2][0] + g[0][2] * g[1][0] * g[2][1]
           - g[0][2] * g[1][1] * g[2][0] - g[0][0] * g[1][2] * g[2][1] - g[0][1] * g[1][0] * g[2][2])
    assert log_ensemble_diversity(probs(*rows), y, DELTA).item() == pytest.approx(math.log(det), rel=1e-9)
    # a different true class removes a different entry and changes the diversity
    assert log_ensemble_diversity(probs(*rows), torch.tensor([0]), DELTA).item() != pytest.approx(math.log(det))


def test_identical_members_have_no_diversity_and_uniform_maximises_entropy() -> None:
    p = probs([0.7, 0.2, 0.1], [0.7, 0.2, 0.1])
    # Gram [[1, 1], [1, 1]] + δI: det = 2δ + δ²
    assert log_ensemble_diversity(p, torch.tensor([0]), DELTA).item() == pytest.approx(
        math.log(2 * DELTA + DELTA ** 2), rel=1e-6)
    u = probs([0.25] * 4, [0.25] * 4, [0.25] * 4)
    assert ensemble_entropy(u).item() == pytest.approx(math.log(4), rel=1e-12)


def test_saturated_softmax_stays_finite() -> None:
    """Non-true probabilities that underflow to 0 give a zero row (Keras' l2_normalize guard), not NaN."""
    z = torch.tensor([[[300.0, 0.0, 0.0]], [[0.0, 300.0, 0.0]]], requires_grad=True)
    loss, terms = adp_terms(list(z), torch.tensor([0]), ADPHyperparameters())
    assert torch.isfinite(loss) and torch.isfinite(terms["log_det"])
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(g).all()


def test_loss_through_the_method_and_term_names() -> None:
    net = lenet_net({"alpha": 2.0, "beta": 0.5}, k=3)
    x, y = batch(5)
    out = net(x, y, ctx(5))
    t = out.terms
    assert set(t) == {"ce", "entropy", "log_det", "ce_0", "ce_1", "ce_2"}
    assert t["ce"].item() == pytest.approx(sum(t[f"ce_{i}"].item() for i in range(3)), abs=1e-6)
    expected = t["ce"].item() - 2.0 * t["entropy"].item() - 0.5 * t["log_det"].item()
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    z = torch.stack([m(x) for m in net.members])
    assert t["entropy"].item() == pytest.approx(ensemble_entropy(z.softmax(-1)).mean().item(), abs=1e-6)
    mean = lenet_net({"ce_reduction": "mean"}, k=3)(x, y, ctx(5))
    assert mean.terms["ce"].item() == pytest.approx(t["ce"].item() / 3, abs=1e-6)


def test_which_parameters_each_term_reaches() -> None:
    net = lenet_net({}, k=2)
    x, y = batch(6)
    out = net(x, y, ctx(6))
    p0, p1 = list(net.members[0].parameters()), list(net.members[1].parameters())

    def reaches(term: str) -> tuple[bool, bool]:
        g = torch.autograd.grad(out.terms[term], p0 + p1, retain_graph=True, allow_unused=True)
        hit = [t is not None and bool(t.abs().sum() > 0) for t in g]
        return any(hit[:len(p0)]), any(hit[len(p0):])

    assert reaches("ce_0") == (True, False)
    assert reaches("ce_1") == (False, True)
    assert reaches("entropy") == (True, True)
    assert reaches("log_det") == (True, True)


def test_alpha_beta_zero_is_independent_ce() -> None:
    net = lenet_net({"alpha": 0.0, "beta": 0.0}, k=2)
    x, y = batch(4)
    out = net(x, y, ctx(4))
    assert out.loss.item() == pytest.approx(out.terms["ce_0"].item() + out.terms["ce_1"].item(), abs=1e-6)
    assert net.method.step_cost(net.method.stages()[0]) == {"fwd_bwd": 2.0}


def test_loss_is_a_per_sample_mean_so_row_splits_agree() -> None:
    net = lenet_net({}, k=2)
    x, y = batch(8, seed=3)
    full = net(x, y, ctx(8)).loss.item()
    halves = [net(x[s], y[s], ctx(4, offset=s.start, global_size=8)).loss.item()
              for s in (slice(0, 4), slice(4, 8))]
    assert full == pytest.approx(sum(halves) / 2, abs=1e-5)


def test_results_report_entropy_and_diversity() -> None:
    net = lenet_net({}, k=3)
    ds = synthetic_dataset(30, seed=1)
    r = net.method.results(net, ds, torch.device("cpu"))
    assert r["n_images"] == 30
    assert 0.0 < r["ensemble_entropy_mean"] <= math.log(10) + 1e-6
    assert 3 * math.log(DELTA) <= r["log_det_mean"] <= 0.0  # det of a Gram of unit vectors is at most 1
    assert net.training


@pytest.mark.parametrize("hp, members, where", [
    ({"alpha": -1.0}, 3, "alpha"),
    ({"beta": 101.0}, 3, "beta"),
    ({"det_offset": 0.0}, 3, "det_offset"),
    ({"ce_reduction": "median"}, 3, "ce_reduction"),
    ({"lamda": 2.0}, 3, "lamda"),
    ({}, 1, "members"),
])
def test_invalid_hyperparameters_name_the_field(hp: dict, members: int, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "adp", "members": members, "hyperparameters": hp})
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(where in loc for loc in locs) or any(where in err["msg"] for err in e.value.errors())


def test_describe() -> None:
    d = next(m for m in describe_methods() if m["name"] == "adp")
    assert d["default_combine"] == "mean_probs" and d["min_members"] == 2 and d["title"] and d["summary"]
    hps = d["hyperparameters"]
    assert set(hps) == {"alpha", "beta", "det_offset", "ce_reduction"}
    assert (hps["alpha"]["default"], hps["beta"]["default"], hps["det_offset"]["default"]) == (2.0, 0.5, 1e-6)
    assert hps["det_offset"]["exclusiveMinimum"] == 0.0
    assert all(h["description"] for h in hps.values())
    spec = TrainSpec.model_validate({"method": "adp"})
    assert spec.resolved()["hyperparameters"] == {"alpha": 2.0, "beta": 0.5, "det_offset": 1e-6,
                                                  "ce_reduction": "sum"}
