"""The papers' variants as named configurations (issue 21): exactly what each changes, computed by hand.

* GAL and TRS (LSD): averaged CE and torch 1.9's cosine ``x·y / max(‖x‖‖y‖, ε)`` on batch-mean gradients;
* TRS (LSD): the smoothness term at the clean points (no PGD);
* DVERGE (LSD): distillation on post-ReLU features;
* DKD: the KD comparator's objective, three voters by default, the collapse guard;
* every named configuration validates and differs from the method's defaults only where its page says.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from linear_members import LinearNet
from pydantic import ValidationError
from torch import nn

from ensemble_core.configurations import CONFIGURATIONS, RECIPES, configuration, train_spec
from ensemble_core.methods import get_method
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.dkd import kd_objective
from ensemble_core.methods.dverge import distill_features, feature_distillation
from ensemble_core.methods.gal import pairwise_grad_cosines, torch19_product_floor
from ensemble_core.spec import TrainSpec
from ensemble_core.training import collapsed_members

torch.set_num_threads(1)

# At x = 0, y = 0 the members' input gradients are ½(1, 0), ½(1, 1), ½(0, −1): dot products ¼, 0, −¼ for the
# pairs (0,1), (0,2), (1,2); norms ½, ½√2, ½; exact cosines 1/√2, 0, −1/√2.
W = [[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, -1.0]]]
R2 = 1 / math.sqrt(2)


def ctx(b: int) -> StepContext:
    return StepContext(0, 0, 0, 0, 1, b, 0, torch.Generator().manual_seed(0), torch.device("cpu"))


def linear_net(method: str, hp: dict[str, Any]) -> TrainNet:
    m = get_method(method).from_spec_dict(hp, members=3, num_classes=2, dataset="mnist", architecture="lenet5")
    return TrainNet([LinearNet(w) for w in W], {}, m)


def x0(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(b, 1, 1, 2), torch.zeros(b, dtype=torch.long)


# ------------------------------------------------------------------------------ the cosine of torch 1.9


def test_product_floor_is_torch19_cosine_on_batch_mean_gradients() -> None:
    g = [torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, -0.5]])]
    assert pairwise_grad_cosines(g).tolist() == [pytest.approx([R2, 0.0, -R2], abs=1e-7)]
    # floor 0.3 sits between the products ½·½√2 = 0.3536 (kept) and ½·½ = 0.25 (floored, but its dot is 0)
    assert pairwise_grad_cosines(g, product_floor=0.3).tolist() == [pytest.approx([R2, 0.0, -R2], abs=1e-7)]
    # floor 0.5 > every product: cosines are dot / 0.5 = ½, 0, −½
    assert pairwise_grad_cosines(g, product_floor=0.5).tolist() == [pytest.approx([0.5, 0.0, -0.5], abs=1e-7)]
    # torch ≤ 1.11 on batch-mean gradients g/B: (g_i/B)·(g_j/B) / max(‖g_i/B‖‖g_j/B‖, ε)
    #   = g_i·g_j / max(‖g_i‖‖g_j‖, εB²)
    assert torch19_product_floor(1e-8, 128) == pytest.approx(1e-8 * 128**2)
    assert torch19_product_floor(0.0, 128) == 0.0


def test_gal_lsd_averages_the_ce_and_floors_the_cosine() -> None:
    b = 6  # six copies of x = 0: floor = 1e-2 · 36 = 0.36 > every product of norms (0.3536, 0.25, 0.3536)
    x, y = x0(b)
    lsd = linear_net("gal", {"lam": 0.5, "ce_reduction": "mean", "cos_eps": 1e-2})(x, y, ctx(b))
    cos = [0.25 / 0.36, 0.0, -0.25 / 0.36]
    coh = math.log(sum(math.exp(c) for c in cos))
    assert lsd.terms["coherence"].item() == pytest.approx(coh, abs=1e-6)
    assert lsd.terms["ce"].item() == pytest.approx(math.log(2), abs=1e-6)  # mean of three CEs of log 2
    assert lsd.loss.item() == pytest.approx(math.log(2) + 0.5 * coh, abs=1e-6)
    ours = linear_net("gal", {"lam": 0.5})(x, y, ctx(b))  # summed CE, exact cosine
    coh_exact = math.log(math.exp(R2) + 1.0 + math.exp(-R2))
    assert ours.loss.item() == pytest.approx(3 * math.log(2) + 0.5 * coh_exact, abs=1e-6)


def test_trs_lsd_smoothness_at_clean_points_mean_ce(monkeypatch: pytest.MonkeyPatch) -> None:
    import ensemble_core.methods.trs as trs

    def no_pgd(*a: Any, **k: Any) -> torch.Tensor:
        raise AssertionError("the LSD variant runs no PGD")

    monkeypatch.setattr(trs, "smoothness_pgd", no_pgd)
    b = 2
    x, y = x0(b)
    hp = {k: v for k, v in configuration("trs-lsd").hyperparameters.items()}
    out = linear_net("trs", hp)(x, y, ctx(b))
    # similarity: mean over pairs of |cos| (cos_eps 1e-8·4 is far below the products): (1/√2 + 0 + 1/√2)/3
    assert out.terms["similarity"].item() == pytest.approx(2 * R2 / 3, abs=1e-6)
    # smoothness: 2‖g/B‖² per member at the clean points, B = 2: 2·(¼, ½, ¼)/4, mean over members
    smooth = (2 * 0.25 + 2 * 0.5 + 2 * 0.25) / 4 / 3
    assert out.terms["smoothness"].item() == pytest.approx(smooth, abs=1e-7)
    assert out.terms["ce"].item() == pytest.approx(math.log(2), abs=1e-6)  # averaged, not summed
    assert out.loss.item() == pytest.approx(math.log(2) + 10 * 2 * R2 / 3 + 10 * smooth, abs=1e-5)
    # our default takes the second half of the batch to PGD points: the PGD is called
    with pytest.raises(AssertionError, match="no PGD"):
        linear_net("trs", {})(x, y, ctx(b))


# ------------------------------------------------------------------------------- DVERGE post-ReLU


class ReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_post_relu_distillation_step_by_hand() -> None:
    """f = Wx (raw) with W = diag(1, −1); x = (0.5, 0.5), target x_s = (0.2, 0.3).

    pre-ReLU: ∇ = 2Wᵀ(Wx − Wx_s) = 2·(0.3, 0.2) → both coordinates step down by α.
    post-ReLU: features relu(0.5, −0.5) = (0.5, 0) vs relu(0.2, −0.3) = (0.2, 0); the second unit is dead
    at x, so ∇ = 2Wᵀ((0.3, 0)⊙(1, 0)) = (0.6, 0): only the first coordinate moves (sign(0) = 0)."""
    net = ReluLinear()
    x, xs = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.2, 0.3]])
    alpha, eps = 0.05, 0.1
    pre, _ = feature_distillation([net], [net.fc], x, xs, eps, alpha, steps=1, momentum=0.0)
    post, _ = feature_distillation([net], [net.fc], x, xs, eps, alpha, steps=1, momentum=0.0, post_relu=True)
    assert pre[0].tolist() == [pytest.approx([0.45, 0.45], abs=1e-7)]
    assert post[0].tolist() == [pytest.approx([0.45, 0.5], abs=1e-7)]
    assert distill_features(net, net.fc, x, post_relu=True).tolist() == [[0.5, 0.0]]
    assert distill_features(net, net.fc, x).tolist() == [[0.5, -0.5]]


@pytest.mark.parametrize("layer,expected", [(1, True), (4, True), (5, False)])
def test_dverge_lsd_rectifies_every_layer_but_the_logits(monkeypatch: pytest.MonkeyPatch, layer: int,
                                                         expected: bool) -> None:
    import ensemble_core.methods.dverge as dv
    from ensemble_core.models import build_model

    seen: list[bool] = []
    real = dv.feature_distillation

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(k["post_relu"])
        return real(*a, **k)

    monkeypatch.setattr(dv, "feature_distillation", spy)
    hp = {**configuration("dverge-lsd").hyperparameters, "layer": layer, "steps": 1}
    m = get_method("dverge").from_spec_dict(hp, members=2, num_classes=10, dataset="mnist", architecture="lenet5")
    torch.manual_seed(0)
    net = TrainNet([build_model("lenet5") for _ in range(2)], {}, m)
    net.set_stage(m.stages()[0])
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    m.loss(net, x, y, StepContext(0, 0, 0, 0, 1, 4, 0, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert seen == [expected]


def test_post_relu_is_refused_where_layers_are_not_followed_by_a_relu() -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "dverge", "architecture": "resnet20", "dataset": "cifar10",
                                  "hyperparameters": {"features": "post_relu"}})
    assert "features" in str(e.value) and "resnet20" in str(e.value)
    TrainSpec.model_validate({"method": "dverge", "architecture": "dkd_mnist",
                              "hyperparameters": {"features": "post_relu"}})


def test_cldl_lsd_floors_the_gradient_cosine_by_hand() -> None:
    """CLDL (LSD): ℓ_gd's per-pair |cos| as torch 1.9 computes it on batch-mean-KL gradients (spec §2.5)."""
    from ensemble_core.methods.cldl import pair_cosines

    g = [torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, -0.5]])]
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert pair_cosines(g, pairs).tolist() == pytest.approx([R2, 0.0, R2], abs=1e-6)  # exact |cos|
    # cos_eps 1e-2 at B = 6: floor 0.36 above every product of norms, so |dot| / 0.36 = 0.25/0.36, 0, 0.25/0.36
    assert pair_cosines(g, pairs, cos_eps=1e-2, batch=6).tolist() == pytest.approx([0.25 / 0.36, 0.0, 0.25 / 0.36],
                                                                                   abs=1e-6)
    assert pair_cosines(g, pairs, cos_eps=1e-8, batch=6).tolist() == pytest.approx([R2, 0.0, R2], abs=1e-6)


def test_cldl_lsd_term_is_what_the_helper_gives() -> None:
    """The training loss reads the floored cosine: on a tiny synthetic net, ℓ_gd with cos_eps equals ℓ_gd from
    the members' own per-sample input gradients through :func:`pair_cosines`, and is below the exact one."""
    from ensemble_core.methods.cldl import gradient_diversity, kl_to_soft_labels, pair_cosines, soft_labels
    from ensemble_core.training import setup_run

    spec = TrainSpec.model_validate({"method": "cldl", "dataset": "synthetic", "members": 3, "train_subset": 64,
                                     "hyperparameters": {"cos_eps": 1e-2}})
    net = setup_run(spec, torch.device("cpu")).net
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    method = net.method
    floored = method.compute_terms(net, x, y, create_graph=False, need_gd=True, global_batch=8)
    method.hp.cos_eps = 0.0
    exact = method.compute_terms(net, x, y, create_graph=False, need_gd=True, global_batch=8)
    assert floored.l_gd is not None and exact.l_gd is not None
    assert float(floored.l_gd) < float(exact.l_gd)
    grads = []
    for m in net.members:
        xi = x.clone().requires_grad_(True)
        parts = m.forward_parts(xi)
        kl = kl_to_soft_labels(soft_labels(net.aux["lcm"](parts.rep, net.aux["lcm"].label_representations()), y,
                                           method.gamma), parts.logits)
        grads.append(torch.autograd.grad(kl.sum(), xi)[0].flatten(1))
    want = gradient_diversity(pair_cosines(grads, [(0, 1), (0, 2), (1, 2)], cos_eps=1e-2, batch=8), 3, "members")
    assert float(floored.l_gd) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("method,hp,field", [("gal", {"cos_eps": 0.1}, "cos_eps"),
                                             ("cldl", {"cos_eps": 0.1}, "cos_eps"),
                                             ("trs", {"cos_eps": -1.0}, "cos_eps"),
                                             ("dverge", {"features": "after"}, "features"),
                                             ("dkd", {"objective": "ce"}, "objective"),
                                             ("dkd", {"kd_temperature": 0.0}, "kd_temperature")])
def test_new_hyperparameters_are_bounded_and_named(method: str, hp: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": method, "hyperparameters": hp})
    assert any(".".join(map(str, err["loc"])).endswith(field) for err in e.value.errors())


# ------------------------------------------------------------------------------------------- DKD


def test_kd_objective_by_hand() -> None:
    z = torch.zeros(1, 2)
    zp = torch.tensor([[math.log(3.0), 0.0]])  # softmax (¾, ¼)
    y = torch.tensor([0])
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((¾, ¼) ‖ (½, ½))
    loss, terms = kd_objective(z, y, [zp, zp], zeta=0.9)
    assert terms["kl"].item() == pytest.approx(kl1, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * math.log(2) + 0.9 * kl1, abs=1e-6)
    # T = 2: p = softmax(log3 / 2, 0) = (√3, 1)/(√3 + 1); T²·KL(p ‖ (½, ½))
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = 4 * (p0 * math.log(2 * p0) + (1 - p0) * math.log(2 * (1 - p0)))
    _, t2 = kd_objective(z, y, [zp], zeta=0.5, temperature=2.0)
    assert t2["kl"].item() == pytest.approx(kl2, abs=1e-6)
    only_ce, _ = kd_objective(z, y, [], zeta=0.9)
    assert only_ce.item() == pytest.approx(math.log(2), abs=1e-6)


def test_kd_configuration_trains_towards_the_predecessors_softmax() -> None:
    from ensemble_core.models import build_model

    m = get_method("dkd").from_spec_dict({"objective": "kd"}, members=3, num_classes=10, dataset="mnist",
                                         architecture="lenet5")
    torch.manual_seed(1)
    net = TrainNet([build_model("lenet5") for _ in range(3)], {}, m)
    net.set_stage(m.stages()[2])
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    out = m.loss(net, x, y, StepContext(0, 0, 2, 0, 1, 5, 0, torch.Generator(), torch.device("cpu")))
    with torch.no_grad():
        expected, _ = kd_objective(net.members[2](x), y, [net.members[0](x), net.members[1](x)], 0.9)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.terms) == {"ce", "kl", "kl_0", "kl_1"}


def test_dkd_votes_with_three_by_default() -> None:
    spec = TrainSpec.model_validate({"method": "dkd"})
    assert spec.members == 4 and TrainSpec.model_validate({"method": "gal"}).members == 3
    m = get_method("dkd").from_spec_dict(spec.hyperparameters, members=spec.members, num_classes=10,
                                         dataset="mnist", architecture="lenet5")
    from ensemble_core.ensemble import combine_rule

    rule = combine_rule(m.combine())
    assert rule.vote is not None and rule.vote.kind == "boosted" and rule.vote.top_n == 2
    z = torch.randn(spec.members, 7, 10)
    assert rule.vote.voters(z).shape[0] == 3  # A1..A3; M is the reference
    # an explicit member count is kept (3 members with auxiliary voting = 2 voters, an ablation)
    assert TrainSpec.model_validate({"method": "dkd", "members": 3}).members == 3
    for name in ("dkd-3voters", "kd-3voters", "dkd-mvote", "ri-3"):
        c = configuration(name)
        r = combine_rule(c.combine or get_method(c.method).from_spec_dict(
            c.hyperparameters, members=c.members, num_classes=10, dataset="mnist", architecture="lenet5").combine())
        assert r.vote is not None and r.vote.voters(torch.randn(c.members, 2, 10)).shape[0] == 3, name


def test_collapse_guard() -> None:
    assert collapsed_members([0.975, 0.932, 0.205]) == [2]
    assert collapsed_members([0.975, 0.932, 0.505]) == [2]
    assert collapsed_members([0.975, 0.932, 0.80]) == []  # 15 points below the others' median 95.35 %
    assert collapsed_members([0.98, 0.10, 0.97, 0.96]) == [1]
    assert collapsed_members([0.5]) == []


def test_collapse_is_logged_and_recorded_by_the_training_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import ensemble_core.training as tr

    real = tr.clean_accuracy

    def fake(ens: Any, ds: Any, device: Any = "cpu", batch_size: int = 500) -> dict[str, Any]:
        r = real(ens, ds, device, batch_size)
        if len(r["member_acc"]) == 3:
            r["member_acc"] = [0.975, 0.932, 0.205]  # the leaderboard's DKD members
        return r

    monkeypatch.setattr(tr, "clean_accuracy", fake)
    logs: list[str] = []
    res = tr.train_ensemble({"method": "baseline", "dataset": "synthetic", "members": 3, "epochs": 1,
                             "train_subset": 128, "eval_subset": 32},
                            hooks=tr.TrainHooks(log=logs.append))
    assert res.history[-1]["member_collapse"] == [2]
    assert any("WARNING member collapse (2: 20.5 %" in line for line in logs)
    assert res.results["member_collapse"]["members"] == [2]


# ----------------------------------------------------------------------------------- configurations


def _defaults(method: str) -> dict[str, Any]:
    return get_method(method).Hyperparameters().model_dump(mode="json")


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_every_configuration_validates_under_every_recipe_of_its_data(name: str) -> None:
    for r in RECIPES:
        spec = TrainSpec.model_validate(train_spec(name, recipe_name=r, seed=3))
        c = configuration(name)
        assert spec.method == c.method and spec.members == c.members and spec.seed == 3


@pytest.mark.parametrize("name,differs", [
    ("gal-lsd", {"ce_reduction": "mean", "cos_eps": 1e-8}),
    ("trs-lsd", {"ce_reduction": "mean", "smooth_points": "clean", "cos_eps": 1e-8, "anneal_epochs": None}),
    ("dverge-lsd", {"features": "post_relu", "eps": 8 / 255, "step_size": 2 / 255}),
    ("adp-lsd", {}),
    ("cldl-3-4-4-lsd", {"gamma": 3.0, "alpha": 4.0, "beta": 4.0, "cos_eps": 1e-8}),
    ("cldl-3-2-1-lsd", {"gamma": 3.0, "alpha": 2.0, "beta": 1.0, "cos_eps": 1e-8}),
])
def test_lsd_variants_differ_from_our_defaults_exactly_where_documented(name: str, differs: dict[str, Any]) -> None:
    c = configuration(name)
    defaults = _defaults(c.method)
    resolved = {**defaults, **c.hyperparameters}
    changed = {k: v for k, v in resolved.items() if v != defaults[k]}
    assert changed == {k: v for k, v in differs.items() if defaults.get(k) != v}


def test_lsd_recipe_is_the_reference_codes() -> None:
    spec = TrainSpec.model_validate(train_spec("baseline", recipe_name="lsd-mnist", seed=0))
    assert spec.passes == 21 and spec.batch_size == 128 and spec.optimizer.eps == 1e-7
    assert spec.optimizer.lr == 1e-3 and spec.optimizer.weight_decay == 1e-4
    assert spec.drop_last is False and spec.hflip is True and spec.augment is False
    assert spec.train_subset is None and spec.architecture == "lenet5"
