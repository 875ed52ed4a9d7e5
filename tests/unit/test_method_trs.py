"""TRS (ensemble_core/methods/trs.py): similarity and smoothness by hand on linear members, the PGD points,
the δ schedule, rank-split invariance, which parameters each term reaches, validation and ``describe()``."""

from __future__ import annotations

import math

import pytest
import torch
from linear_members import LinearNet
from pydantic import ValidationError
from torch import nn

from ensemble_core.data import synthetic_dataset
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.gal import member_input_gradients
from ensemble_core.methods.trs import (
    TRSHyperparameters,
    perturbed_rows,
    smooth_eps,
    smoothness_per_sample,
    smoothness_pgd,
)
from ensemble_core.models import build_model
from ensemble_core.spec import TrainSpec

torch.set_num_threads(1)


# At x = 0, y = 0 the input gradients are ½(1, 0), ½(1, 1), ½(0, −1): cosines 1/√2, 0, −1/√2 and
# norms ½, ½√2, ½.
W = [[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, -1.0]]]
R2 = 1 / math.sqrt(2)


def method(hp: dict, members: int = 3, classes: int = 2):
    return get_method("trs").from_spec_dict(hp, members=members, num_classes=classes, dataset="mnist",
                                            architecture="lenet5")


def ctx(local: int, offset: int = 0, global_size: int | None = None, epoch: int = 0, seed: int = 0,
        world: int = 1) -> StepContext:
    return StepContext(epoch, 0, 0, 0, world, global_size or local, offset, torch.Generator().manual_seed(seed),
                       torch.device("cpu"))


def linear_net(hp: dict, k: int = 3) -> TrainNet:
    return TrainNet([LinearNet(W[i]) for i in range(k)], {}, method(hp, k))


def lenet_members(k: int, seed: int = 30) -> list[nn.Module]:
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        out.append(build_model("lenet5"))
    return out


def lenet_net(hp: dict, k: int = 2) -> TrainNet:
    return TrainNet(lenet_members(k), {}, method(hp, k, 10))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = synthetic_dataset(n, seed=seed)
    return ds.images.float() / 255, ds.labels


def test_similarity_and_smoothness_by_hand() -> None:
    x, y = torch.zeros(1, 1, 1, 2), torch.tensor([0])
    base = {"smooth_points": "clean", "grad_scale": "per_sample", "lambda_a": 3.0, "lambda_b": 2.0}
    out = linear_net({**base, "smooth_norm": "squared"})(x, y, ctx(1))
    sim = (R2 + 0.0 + R2) / 3  # mean over the three pairs of |cos|
    smooth_sq = (2 * 0.25 + 2 * 0.5 + 2 * 0.25) / 3  # mean over members of 2‖g‖²
    assert out.terms["similarity"].item() == pytest.approx(sim, abs=1e-6)
    assert out.terms["smoothness"].item() == pytest.approx(smooth_sq, abs=1e-6)
    assert out.terms["ce"].item() == pytest.approx(3 * math.log(2), abs=1e-6)
    assert out.loss.item() == pytest.approx(3 * math.log(2) + 3.0 * sim + 2.0 * smooth_sq, abs=1e-5)
    l2 = linear_net({**base, "smooth_norm": "l2"})(x, y, ctx(1))
    assert l2.terms["smoothness"].item() == pytest.approx((0.5 + 0.5 * math.sqrt(2) + 0.5) / 3, abs=1e-6)


def test_batch_mean_scaling_divides_the_gradient_by_the_global_batch() -> None:
    """The released code differentiates the batch-mean CE: with B = 4, 2‖g/4‖² = 2‖g‖²/16."""
    x, y = torch.zeros(4, 1, 1, 2), torch.zeros(4, dtype=torch.long)
    hp = {"smooth_points": "clean", "grad_scale": "batch_mean", "smooth_norm": "squared"}
    out = linear_net(hp)(x, y, ctx(4))
    assert out.terms["smoothness"].item() == pytest.approx((2 * 0.25 + 2 * 0.5 + 2 * 0.25) / 3 / 16, abs=1e-7)
    # on a rank holding 2 of the 4 rows the scale is still 1/4 (global batch), not 1/2
    half = linear_net(hp)(x[:2], y[:2], ctx(2, offset=2, global_size=4))
    assert half.terms["smoothness"].item() == pytest.approx(out.terms["smoothness"].item(), rel=1e-6)


def test_smoothness_terms_per_member() -> None:
    g = [torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])]
    assert smoothness_per_sample(g, "squared", 1.0).tolist() == [[50.0], [0.0]]
    assert smoothness_per_sample(g, "l2", 0.5).tolist() == [[2.5], [pytest.approx(1e-15)]]


def test_eps_schedule_and_spec_fills_anneal_epochs() -> None:
    hp = TRSHyperparameters(anneal_epochs=10)
    assert smooth_eps(hp, 0) == pytest.approx(0.1)
    assert smooth_eps(hp, 5) == pytest.approx(0.15)
    assert smooth_eps(hp, 10) == pytest.approx(0.2) and smooth_eps(hp, 25) == pytest.approx(0.2)
    assert TrainSpec.model_validate({"method": "trs", "epochs": 7}).hyperparameters["anneal_epochs"] == 7
    kept = TrainSpec.model_validate({"method": "trs", "epochs": 7, "hyperparameters": {"anneal_epochs": 3}})
    assert kept.hyperparameters["anneal_epochs"] == 3
    assert TRSHyperparameters().anneal_epochs is None and smooth_eps(TRSHyperparameters(), 0) == pytest.approx(0.1)


def test_perturbed_rows_follow_the_global_index() -> None:
    assert perturbed_rows(ctx(8), 8, "half_pgd").tolist() == [False] * 4 + [True] * 4
    assert perturbed_rows(ctx(4, offset=0, global_size=8), 4, "half_pgd").tolist() == [False] * 4
    assert perturbed_rows(ctx(4, offset=4, global_size=8), 4, "half_pgd").tolist() == [True] * 4
    assert perturbed_rows(ctx(3), 3, "pgd").all() and not perturbed_rows(ctx(3), 3, "clean").any()


def test_pgd_points_stay_in_the_ball_and_raise_the_gradient_magnitude() -> None:
    """On smooth (linear) members the magnitude PGD ascends; on ReLU nets the magnitude is piecewise and
    its gradient sees only the softmax curvature, so the ascent is checked where it is well defined."""
    g = torch.Generator().manual_seed(3)
    members = [LinearNet((torch.randn(3, 8, generator=g) * 2).tolist()) for _ in range(2)]
    x = torch.rand(6, 1, 1, 8, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    eps = 0.1
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    x_adv = smoothness_pgd(members, x, y, eps, eps / 3, 6, noise, "squared")
    assert x_adv.grad_fn is None and not x_adv.requires_grad  # constants for the outer loss
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > eps / 2  # it moved

    def magnitude(z: torch.Tensor) -> torch.Tensor:
        _, grads = member_input_gradients(members, z, y, create_graph=False)
        return smoothness_per_sample(grads, "squared", 1.0).sum(0)  # per sample, summed over members

    start = (x + eps * noise).clamp(0, 1)
    assert (magnitude(x_adv) > magnitude(start)).all() and (magnitude(x_adv) > magnitude(x)).all()
    # lenet members: the PGD points are constants inside the ball as well
    lm = lenet_members(2)
    xb, yb = batch(3, seed=4)
    xl = smoothness_pgd(lm, xb, yb, eps, eps / 3, 2, None, "l2")
    assert not xl.requires_grad and (xl - xb).abs().max() <= eps + 1e-6


def test_half_pgd_only_changes_the_second_half() -> None:
    """Rows 0-1 of a 4-row batch are clean: their smoothness equals the clean one; rows 2-3 differ."""
    x, y = batch(4, seed=5)
    net = lenet_net({"smooth_points": "half_pgd", "grad_scale": "per_sample", "lambda_b": 1.0})
    clean = lenet_net({"smooth_points": "clean", "grad_scale": "per_sample", "lambda_b": 1.0})
    first = net(x[:2], y[:2], ctx(2, offset=0, global_size=4)).terms["smoothness"].item()
    assert first == pytest.approx(clean(x[:2], y[:2], ctx(2)).terms["smoothness"].item(), rel=1e-6)
    second = net(x[2:], y[2:], ctx(2, offset=2, global_size=4)).terms["smoothness"].item()
    assert second != pytest.approx(clean(x[2:], y[2:], ctx(2)).terms["smoothness"].item(), rel=1e-3)


def test_rank_split_gives_the_same_loss_and_gradient() -> None:
    """Two ranks' halves (same step generator) average to the one-process loss and gradient (DDP's rule)."""
    x, y = batch(8, seed=6)
    hp = {"smooth_points": "pgd", "grad_scale": "per_sample"}
    full_net = lenet_net(hp)
    full = full_net(x, y, ctx(8, seed=9, epoch=1))
    full.loss.backward()
    g_full = [p.grad.clone() for p in full_net.parameters()]
    split_net = lenet_net(hp)
    losses = []
    for s in (slice(0, 4), slice(4, 8)):
        out = split_net(x[s], y[s], ctx(4, offset=s.start, global_size=8, seed=9, epoch=1, world=2))
        (out.loss / 2).backward()
        losses.append(out.loss.item())
    assert full.loss.item() == pytest.approx(sum(losses) / 2, abs=1e-5)
    for a, p in zip(g_full, split_net.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_which_parameters_each_term_reaches() -> None:
    net = lenet_net({"smooth_points": "clean", "grad_scale": "per_sample"})
    x, y = batch(6)
    p0, p1 = list(net.members[0].parameters()), list(net.members[1].parameters())
    out = net(x, y, ctx(6))

    def reaches(t: torch.Tensor) -> tuple[bool, bool]:
        g = torch.autograd.grad(t, p0 + p1, retain_graph=True, allow_unused=True)
        hit = [v is not None and bool(v.abs().sum() > 0) for v in g]
        return any(hit[:len(p0)]), any(hit[len(p0):])

    assert reaches(out.terms["ce_0"]) == (True, False)
    assert reaches(out.terms["similarity"]) == (True, True)
    assert reaches(out.terms["smoothness"]) == (True, True)  # the mean over both members
    _, grads = member_input_gradients(list(net.members), x, y, create_graph=True)
    per = smoothness_per_sample(grads, "squared", 1.0)
    assert reaches(per[0].sum()) == (True, False)  # member 0's smoothness: member 0 only
    conv1 = torch.autograd.grad(per[1].sum(), net.members[1].conv1.weight)[0]
    assert conv1.abs().sum() > 0  # reached through the input-gradient graph (double backprop)


def test_switches_and_step_cost() -> None:
    x, y = batch(4)
    no_smooth = lenet_net({"lambda_b": 0.0})
    out = no_smooth(x, y, ctx(4))
    assert "smoothness" not in out.terms and "similarity" in out.terms
    stage = no_smooth.method.stages()[0]
    assert no_smooth.method.step_cost(stage) == {"double": 2.0}
    assert lenet_net({"lambda_a": 0.0, "lambda_b": 0.0}).method.step_cost(stage) == {"fwd_bwd": 2.0}
    assert lenet_net({}).method.step_cost(stage) == {"double": 2.0 * (1 + 0.5 * 7)}
    assert lenet_net({"smooth_points": "clean"}).method.step_cost(stage) == {"double": 2.0}
    plain = lenet_net({"lambda_a": 0.0, "lambda_b": 0.0})(x, y, ctx(4))
    assert plain.loss.item() == pytest.approx(plain.terms["ce_0"].item() + plain.terms["ce_1"].item(), abs=1e-6)


def test_results_report_gradient_cosines() -> None:
    net = lenet_net({}, k=3)
    r = net.method.results(net, synthetic_dataset(20, seed=2), torch.device("cpu"))
    assert r["n_images"] == 20 and 0.0 <= r["grad_abs_cos_mean"] <= 1.0
    assert net.training


@pytest.mark.parametrize("hp, members, where", [
    ({"lambda_a": -1.0}, 3, "lambda_a"),
    ({"lambda_b": 1e5}, 3, "lambda_b"),
    ({"init_eps": 0.3, "adv_eps": 0.2}, 3, "adv_eps"),
    ({"pgd_steps": 0}, 3, "pgd_steps"),
    ({"smooth_norm": "l1"}, 3, "smooth_norm"),
    ({"smooth_points": "adv"}, 3, "smooth_points"),
    ({"anneal_epochs": 0}, 3, "anneal_epochs"),
    ({"scale": 5.0}, 3, "scale"),
    ({}, 1, "members"),
])
def test_invalid_hyperparameters_name_the_field(hp: dict, members: int, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "trs", "members": members, "hyperparameters": hp})
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(where in loc for loc in locs) or any(where in err["msg"] for err in e.value.errors())


def test_describe() -> None:
    d = next(m for m in describe_methods() if m["name"] == "trs")
    assert d["default_combine"] == "mean_probs" and d["min_members"] == 2 and d["title"] and d["summary"]
    hps = d["hyperparameters"]
    assert set(hps) == {"lambda_a", "lambda_b", "smooth_norm", "grad_scale", "smooth_points", "init_eps",
                        "adv_eps", "anneal_epochs", "pgd_steps", "pgd_step_ratio", "craft_bn_mode", "ce_reduction",
                        "cos_eps"}
    assert (hps["lambda_a"]["default"], hps["lambda_b"]["default"]) == (10.0, 10.0)
    assert (hps["init_eps"]["default"], hps["adv_eps"]["default"], hps["pgd_steps"]["default"]) == (0.1, 0.2, 6)
    assert hps["smooth_points"]["enum"] == ["half_pgd", "pgd", "clean"]
    assert all(h["description"] for h in hps.values())
