"""GAL (ensemble_core/methods/gal.py): the coherence loss by hand on linear members, double backprop
against finite differences, which parameters each term reaches, validation and ``describe()``."""

from __future__ import annotations

import math

import pytest
import torch
from linear_members import LinearNet
from pydantic import ValidationError

from ensemble_core.data import synthetic_dataset
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.gal import gal_coherence, member_input_gradients, pairwise_grad_cosines
from ensemble_core.models import build_model
from ensemble_core.spec import TrainSpec

torch.set_num_threads(1)


# At x = 0 every member predicts (1/2, 1/2); with y = 0, ∇_x CE_i = W_iᵀ(−½, ½) = ½·(row 1 − row 0):
# member 0 → ½(1, 0), member 1 → ½(1, 1), member 2 → ½(0, −1).
W = [[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, -1.0]]]
R2 = 1 / math.sqrt(2)


def method(hp: dict, members: int = 3):
    return get_method("gal").from_spec_dict(hp, members=members, num_classes=2, dataset="mnist",
                                            architecture="lenet5")


def ctx(local: int, offset: int = 0, global_size: int | None = None) -> StepContext:
    return StepContext(0, 0, 0, 0, 1, global_size or local, offset, torch.Generator().manual_seed(0),
                       torch.device("cpu"))


def linear_net(hp: dict, k: int = 3) -> TrainNet:
    return TrainNet([LinearNet(W[i]) for i in range(k)], {}, method(hp, k))


def lenet_net(hp: dict, k: int = 2) -> TrainNet:
    members = []
    for i in range(k):
        torch.manual_seed(10 + i)
        members.append(build_model("lenet5"))
    return TrainNet(members, {}, get_method("gal").from_spec_dict(hp, members=k, num_classes=10,
                                                                   dataset="mnist", architecture="lenet5"))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = synthetic_dataset(n, seed=seed)
    return ds.images.float() / 255, ds.labels


X0 = torch.zeros(1, 1, 1, 2)
Y0 = torch.tensor([0])


def test_input_gradients_are_the_closed_form_ones() -> None:
    members = [LinearNet(w) for w in W]
    _, grads = member_input_gradients(members, X0, Y0, create_graph=False)
    expected = [[0.5, 0.0], [0.5, 0.5], [0.0, -0.5]]
    for g, e in zip(grads, expected, strict=True):
        assert g.tolist() == [pytest.approx(e, abs=1e-7)]
    cos = pairwise_grad_cosines(grads)  # pairs (0,1), (0,2), (1,2)
    assert cos.tolist() == [pytest.approx([R2, 0.0, -R2], abs=1e-6)]


def test_loss_by_hand_three_members() -> None:
    net = linear_net({"lam": 0.5})
    out = net(X0, Y0, ctx(1))
    coh = math.log(math.exp(R2) + 1.0 + math.exp(-R2))
    assert out.terms["coherence"].item() == pytest.approx(coh, abs=1e-6)
    assert out.terms["ce"].item() == pytest.approx(3 * math.log(2), abs=1e-6)  # summed CE
    assert out.loss.item() == pytest.approx(3 * math.log(2) + 0.5 * coh, abs=1e-6)
    assert out.terms["grad_cos"].item() == pytest.approx(0.0, abs=1e-6)  # (R2 + 0 − R2) / 3
    mean_ce = linear_net({"lam": 2.0, "ce_reduction": "mean"})(X0, Y0, ctx(1))
    assert mean_ce.loss.item() == pytest.approx(math.log(2) + 2.0 * coh, abs=1e-6)


def test_two_members_coherence_is_the_cosine() -> None:
    out = linear_net({"lam": 1.0}, k=2)(X0, Y0, ctx(1))
    assert out.terms["coherence"].item() == pytest.approx(R2, abs=1e-6)  # log(exp(cos)) for one pair


def test_coherence_bounds_and_batch_mean() -> None:
    cos = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    assert gal_coherence(cos).item() == pytest.approx(math.log(3), abs=1e-6)  # mean of log3+1 and log3−1
    assert gal_coherence(cos[:1]).item() == pytest.approx(math.log(3) + 1, abs=1e-6)


def test_zero_gradient_gives_cosine_zero_not_nan() -> None:
    g = [torch.zeros(2, 4), torch.ones(2, 4)]
    assert pairwise_grad_cosines(g).tolist() == [[0.0], [0.0]]


def test_double_backprop_matches_finite_differences() -> None:
    """d(coherence)/dW by autograd (through the input gradients) equals a central difference, in float64."""
    x = torch.tensor([[[[0.3, -0.2]]], [[[0.1, 0.4]]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    members = [LinearNet(w).double() for w in W]
    with torch.no_grad():
        members[1].classifier.weight.add_(torch.tensor([[0.2, -0.1], [0.0, 0.3]], dtype=torch.float64))

    def coherence() -> torch.Tensor:
        _, grads = member_input_gradients(members, x, y, create_graph=True)
        return gal_coherence(pairwise_grad_cosines(grads))

    w = members[1].classifier.weight
    (auto,) = torch.autograd.grad(coherence(), w)
    h = 1e-6
    for idx in [(0, 0), (1, 1), (0, 1)]:
        w.data[idx] += h
        up = coherence().item()
        w.data[idx] -= 2 * h
        down = coherence().item()
        w.data[idx] += h
        assert auto[idx].item() == pytest.approx((up - down) / (2 * h), abs=1e-7)
    assert auto.abs().max() > 1e-3  # the term does reach the weights


def test_which_parameters_each_term_reaches() -> None:
    net = lenet_net({"lam": 0.5}, k=2)
    x, y = batch(6)
    out = net(x, y, ctx(6))
    p0, p1 = list(net.members[0].parameters()), list(net.members[1].parameters())
    g_ce0 = torch.autograd.grad(out.terms["ce_0"], p0 + p1, retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in g_ce0[:len(p0)][::2])  # weights of member 0
    assert all(g is None or g.abs().sum() == 0 for g in g_ce0[len(p0):])  # nothing for member 1
    g_coh = torch.autograd.grad(out.terms["coherence"], p0 + p1, retain_graph=True, allow_unused=True)
    for conv_w in (g_coh[0], g_coh[len(p0)]):  # each member's conv1.weight: only via the input-gradient graph
        assert conv_w is not None and conv_w.abs().sum() > 0
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in p0 + p1)


def test_lambda_zero_is_independent_ce_without_double_backprop() -> None:
    net = lenet_net({"lam": 0.0}, k=2)
    x, y = batch(4)
    out = net(x, y, ctx(4))
    assert "coherence" not in out.terms
    assert out.loss.item() == pytest.approx(out.terms["ce_0"].item() + out.terms["ce_1"].item(), abs=1e-6)
    stage = net.method.stages()[0]
    assert net.method.step_cost(stage) == {"fwd_bwd": 2.0}
    assert lenet_net({"lam": 0.5}, k=3).method.step_cost(stage) == {"double": 2.0}


def test_loss_is_a_per_sample_mean_so_row_splits_agree() -> None:
    """Two halves of a batch average to the whole batch: what DDP's gradient averaging relies on."""
    net = lenet_net({"lam": 0.5}, k=2)
    x, y = batch(8, seed=2)
    full = net(x, y, ctx(8)).loss.item()
    halves = [net(x[s], y[s], ctx(4, offset=s.start, global_size=8)).loss.item()
              for s in (slice(0, 4), slice(4, 8))]
    assert full == pytest.approx(sum(halves) / 2, abs=1e-5)


def test_results_report_gradient_cosines() -> None:
    net = lenet_net({}, k=3)
    ds = synthetic_dataset(40, seed=1)
    r = net.method.results(net, ds, torch.device("cpu"))
    assert r["n_images"] == 40 and set(r["grad_cos"]) == {"0-1", "0-2", "1-2"}
    assert -1.0 <= r["grad_cos_mean"] <= 1.0 and 0.0 <= r["grad_abs_cos_mean"] <= 1.0
    assert all(v > 0 for v in r["grad_norm_mean"].values())
    assert net.training  # restored


@pytest.mark.parametrize("hp, members, where", [
    ({"lam": -0.1}, 3, "lam"),
    ({"lam": 101.0}, 3, "lam"),
    ({"ce_reduction": "max"}, 3, "ce_reduction"),
    ({"lambda": 0.5}, 3, "lambda"),
    ({}, 1, "members"),
])
def test_invalid_hyperparameters_name_the_field(hp: dict, members: int, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "gal", "members": members, "hyperparameters": hp})
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(where in loc for loc in locs) or any(where in err["msg"] for err in e.value.errors())


def test_describe() -> None:
    d = next(m for m in describe_methods() if m["name"] == "gal")
    assert d["default_combine"] == "mean_probs" and d["min_members"] == 2 and d["title"] and d["summary"]
    hps = d["hyperparameters"]
    assert set(hps) == {"lam", "ce_reduction", "cos_eps"}
    assert hps["cos_eps"]["default"] == 0.0 and hps["cos_eps"]["maximum"] == 1e-2
    assert hps["lam"]["default"] == 0.5 and hps["lam"]["minimum"] == 0.0 and hps["lam"]["maximum"] == 100.0
    assert hps["ce_reduction"]["default"] == "sum" and hps["ce_reduction"]["enum"] == ["sum", "mean"]
    assert all(h["description"] for h in hps.values())
    spec = TrainSpec.model_validate({"method": "gal"})
    assert spec.resolved()["hyperparameters"] == {"lam": 0.5, "ce_reduction": "sum", "cos_eps": 0.0}
