"""DVERGE (Yang et al. 2020): feature distillation, cross-training on the other members' distilled images,
the per-epoch layer, the per-member optimiser equivalence, hyperparameters and describe()."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ensemble_core.data import synthetic_dataset
from ensemble_core.methods import describe_methods, get_method, method_constraints
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.dverge import (
    DVERGE,
    cross_training_loss,
    distill_layers,
    epoch_layer,
    feature_distillation,
    layer_output,
    other_image_index,
    resolve_distillation,
)
from ensemble_core.models import build_model, model_names
from ensemble_core.training import make_optimizer, train_ensemble

torch.set_num_threads(1)


class Tiny(nn.Module):
    """Two weighted layers (distillation layers 1 and 2): Linear 16 → 6, ReLU, Linear 6 → 3."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(16, 6), nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make(members: int = 3, dataset: str = "synthetic", **hp: Any) -> DVERGE:
    m = get_method("dverge").from_spec_dict(dict(hp), members=members, num_classes=3, dataset=dataset,
                                            architecture="lenet5")
    assert isinstance(m, DVERGE)
    return m


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def ctx_for(b: int, seed: int = 7, *, epoch: int = 0, step: int = 0, rank: int = 0, world: int = 1,
            offset: int = 0, global_batch: int | None = None) -> StepContext:
    return StepContext(epoch, step, 0, rank, world, global_batch or b, offset,
                       torch.Generator().manual_seed(seed + step), torch.device("cpu"))


def tiny_net(method: DVERGE, n: int = 3) -> TrainNet:
    net = TrainNet([Tiny(s) for s in range(n)], {}, method)
    net.set_stage(method.stages()[-1])
    return net


# ------------------------------------------------------------------------------------- distillation


def test_one_distillation_step_by_hand_on_a_linear_member() -> None:
    """f(x) = Wx + b: ∇_x ‖W x − W x_s‖² = 2 Wᵀ W (x − x_s); one step x − α·sign(∇), clipped."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 5)
    x, xs = torch.rand(4, 16), torch.rand(4, 16)
    eps, alpha = 0.05, 0.02
    out, _ = feature_distillation([lin], [lin], x, xs, eps, alpha, steps=1)
    with torch.no_grad():
        w = lin.weight
        grad = 2 * (x - xs) @ w.T @ w
        expected = (x - alpha * grad.sign()).clamp(0, 1)
    assert out.shape == (1, 4, 16)
    assert torch.allclose(out[0], expected, atol=1e-7)


def test_two_steps_with_l1_normalised_momentum_by_hand() -> None:
    """The released code's update: g ← μ·g + ∇/‖∇‖₁ per sample, x ← clip(x − α·sign(g))."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 5)
    x, xs = torch.rand(3, 16), torch.rand(3, 16)
    eps, alpha, mu = 0.1, 0.03, 1.0

    def grad_at(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return 2 * (lin(z) - lin(xs)) @ lin.weight

    g1 = grad_at(x)
    acc = g1 / g1.abs().sum(1, keepdim=True)
    x1 = torch.min(torch.max(x - alpha * acc.sign(), x - eps), x + eps).clamp(0, 1)
    g2 = grad_at(x1)
    acc = mu * acc + g2 / g2.abs().sum(1, keepdim=True)
    x2 = torch.min(torch.max(x1 - alpha * acc.sign(), x - eps), x + eps).clamp(0, 1)
    out, _ = feature_distillation([lin], [lin], x, xs, eps, alpha, steps=2, momentum=mu)
    assert torch.allclose(out[0], x2, atol=1e-7)
    plain, _ = feature_distillation([lin], [lin], x, xs, eps, alpha, steps=2, momentum=0.0)
    g2_plain = grad_at(x1)
    x2_plain = torch.min(torch.max(x1 - alpha * g2_plain.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(plain[0], x2_plain, atol=1e-7)


def test_the_momentum_normalises_each_step_by_its_l1_norm() -> None:
    """A case where the L1 normalisation decides the sign: f(x) = diag(1, 100)·x, one image.

    Step 1: ∇ = 2·diag(1, 10⁴)(x − x_s) = (−0.1, −1500); both coordinates move +α. Step 2: ∇ = (0.05, ≈0)
    (coordinate 2 has reached x_s). Normalised: −0.1/1500.1 + 0.05/0.05 > 0, so coordinate 1 steps back
    to 0.5; without the normalisation −0.1 + 0.05 < 0 would move it on to 0.65.
    """
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([1.0, 100.0])))
    x, xs = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.55, 0.575]])
    out, _ = feature_distillation([lin], [lin], x, xs, eps=0.5, alpha=0.075, steps=2, momentum=1.0)
    assert out[0, 0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert out[0, 0, 1].item() == pytest.approx(0.575 + 0.075, abs=1e-6)  # sign(−1 + ≈0) keeps moving up


def test_distillation_moves_features_toward_the_target_and_stays_in_the_ball() -> None:
    members = [Tiny(0), Tiny(1)]
    x, _ = batch(16)
    xs = x.roll(1, 0)
    eps = 0.2
    layers = [m.fc1 for m in members]
    out, terms = feature_distillation(members, layers, x, xs, eps, 0.02, steps=20)
    assert not out.requires_grad
    assert (out - x).abs().max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
    for j, m in enumerate(members):
        with torch.no_grad():
            before = (m.fc1(x.flatten(1)) - m.fc1(xs.flatten(1))).pow(2).sum(1)
            after = (m.fc1(out[j].flatten(1)) - m.fc1(xs.flatten(1))).pow(2).sum(1)
        assert (after < before).all(), f"member {j}: distillation did not reduce every feature distance"
        assert after.mean() < 0.7 * before.mean()
    assert terms["distill_dist"] < terms["distill_dist0"]
    # member j's image is distilled on member j's features: swapping the members changes it
    swapped, _ = feature_distillation(members[::-1], layers[::-1], x, xs, eps, 0.02, steps=20)
    assert torch.allclose(swapped[0], out[1]) and not torch.allclose(out[0], out[1])


def test_layer_output_stops_at_the_layer_and_matches_the_forward() -> None:
    torch.manual_seed(0)
    m = build_model("lenet5")
    x = torch.rand(4, 1, 28, 28)
    layers = distill_layers(m)
    assert [type(layer).__name__ for layer in layers] == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]
    called: list[str] = []
    m.classifier.register_forward_hook(lambda *a: called.append("classifier"))
    with torch.no_grad():
        first = layer_output(m, layers[0], x)
        assert called == []  # the forward stopped at conv1
        assert torch.allclose(first, m.conv1(m.normalize(x)))
        assert torch.allclose(layer_output(m, layers[3], x), m.forward_parts(x).rep)
        assert torch.allclose(layer_output(m, layers[4], x), m(x))
    assert not m._forward_hooks and all(not layer._forward_hooks for layer in layers[:4])  # hooks removed


@pytest.mark.parametrize("arch", model_names())
def test_distillation_layers_are_in_forward_order(arch: str) -> None:
    """Layer l is the l-th weighted layer the forward pass runs, for every registered architecture."""
    rgb = arch.startswith("resnet") or "cifar" in arch
    size, ch = (32, 3) if rgb else (28, 1)
    m = build_model(arch, in_channels=ch, image_size=size).eval()
    layers = distill_layers(m)
    order: list[nn.Module] = []
    handles = [layer.register_forward_hook(lambda mod, i, o: order.append(mod)) for layer in layers]
    with torch.no_grad():
        m(torch.rand(1, ch, size, size))
    for h in handles:
        h.remove()
    assert order == layers
    assert layers[-1] is m.classifier  # layer `depth` is the logits, as in DVERGE


# ------------------------------------------------------------------------------------- targets, layer


def test_targets_are_other_images_and_do_not_depend_on_the_worker_count() -> None:
    g = 16
    single = other_image_index(ctx_for(g, 3), g)
    assert (single != torch.arange(g)).all() and single.min() >= 0 and single.max() < g
    halves = [other_image_index(ctx_for(8, 3, rank=r, world=2, offset=8 * r, global_batch=g), 8) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), single)
    draws = torch.cat([other_image_index(ctx_for(g, s), g) - torch.arange(g) for s in range(200)]) % g
    assert set(draws.tolist()) == set(range(1, g))  # every other offset occurs, never 0


def _loop_ctx(seed: int, stage: int, epoch: int, step: int, rank: int = 0, with_epoch_seed: bool = True
              ) -> StepContext:
    """The step context exactly as the shared training loop builds it (training.py)."""
    epoch_seed = (seed * 1_000_003 + stage * 10_007 + epoch) * 100_003
    g = torch.Generator().manual_seed(epoch_seed + step)
    return StepContext(epoch, step, stage, rank, 2, 16, 8 * rank, g, torch.device("cpu"),
                       epoch_seed=epoch_seed if with_epoch_seed else None)


def test_the_epoch_seed_and_the_fallback_name_the_same_layer() -> None:
    for epoch in range(10):
        assert epoch_layer(_loop_ctx(3, 1, epoch, 7), 5) == epoch_layer(_loop_ctx(3, 1, epoch, 7, 0, False), 5)


def test_epoch_layer_is_fixed_within_an_epoch_and_varies_across_epochs_and_seeds() -> None:
    depth = 5
    for epoch in range(3):
        layers = {epoch_layer(_loop_ctx(0, 0, epoch, step, rank), depth) for step in range(20) for rank in (0, 1)}
        assert len(layers) == 1 and 1 <= next(iter(layers)) <= depth
    per_epoch = [epoch_layer(_loop_ctx(0, 0, e, 0), depth) for e in range(40)]
    assert set(per_epoch) == set(range(1, depth + 1))  # uniform over 1..depth: 40 draws hit every layer
    assert per_epoch != [epoch_layer(_loop_ctx(1, 0, e, 0), depth) for e in range(40)]


def test_the_training_loop_uses_one_layer_per_epoch_and_records_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int]] = []
    original = DVERGE.layer_for

    def spy(self: DVERGE, ctx: StepContext, depth: int) -> int:
        layer = original(self, ctx, depth)
        seen.append((ctx.epoch, ctx.step, layer))
        return layer

    monkeypatch.setattr(DVERGE, "layer_for", spy)
    spec = {"method": "dverge", "dataset": "synthetic", "members": 2, "epochs": 3, "batch_size": 16,
            "train_subset": 48, "eval_subset": 32, "val_size": 0, "seed": 4,
            "hyperparameters": {"steps": 2}, "optimizer": {"name": "adam", "lr": 1e-3}}
    result = train_ensemble(spec)
    by_epoch: dict[int, set[int]] = {}
    for epoch, _, layer in seen:
        by_epoch.setdefault(epoch, set()).add(layer)
    assert sorted(by_epoch) == [0, 1, 2] and len(seen) == 9
    assert all(len(v) == 1 for v in by_epoch.values())
    assert [h["train_distill_layer"] for h in result.history] == [float(next(iter(by_epoch[e]))) for e in range(3)]


# ------------------------------------------------------------------------------------- the objective


def test_cross_training_loss_by_hand() -> None:
    """N = 3: member i's loss sums its CE on the two other members' batches; the diagonal is unused."""
    y = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 3, 2, 3, generator=g)  # [i, j]: member i on member j's distilled batch
    logits = [full[i][[j for j in range(3) if j != i]] for i in range(3)]
    losses, accs = cross_training_loss(logits, y)
    for i in range(3):
        expected = sum(F.cross_entropy(full[i, j], y) for j in range(3) if j != i)
        assert losses[i].item() == pytest.approx(float(expected), abs=1e-6)
        right = sum(int((full[i, j].argmax(-1) == y).sum()) for j in range(3) if j != i)
        assert accs[i].item() == pytest.approx(right / 4)


def _expected_losses(method: DVERGE, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext,
                     labels: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """L_i by an explicit loop: the same target draw and distillation, then Σ_{j≠i} CE(f_i(x'_j), labels).
    ``ctx`` must be a fresh context seeded like the one the method saw."""
    members = net.trainable()
    idx = other_image_index(ctx, x.shape[0])
    layer = method.layer_for(ctx, 2)
    cfg = method.distillation
    distilled, _ = feature_distillation(members, [distill_layers(m)[layer - 1] for m in members], x, x[idx],
                                        cfg.eps, cfg.step_size, cfg.steps, method.hp.momentum)
    lab = y if labels is None else labels
    losses = []
    for i, m in enumerate(members):
        total = torch.zeros(())
        for j in range(len(members)):
            if j != i:
                total = total + F.cross_entropy(m(distilled[j]), lab)
        losses.append(total)
    return losses, idx


def test_method_loss_is_the_explicit_cross_training_loss_with_source_labels() -> None:
    method = make(eps=0.1, step_size=0.02, steps=3)
    net = tiny_net(method)
    x, y = batch(8)
    out = method.loss(net, x, y, ctx_for(8, 11))
    expected, idx = _expected_losses(method, net, x, y, ctx_for(8, 11))
    assert float(out.loss.detach()) == pytest.approx(float(sum(e.detach() for e in expected)), rel=1e-6)
    for i in range(3):
        assert out.terms[f"loss_{i}"].item() == pytest.approx(float(expected[i].detach()), rel=1e-6)
    # labelled with the targets' labels instead, the loss would differ: the check can fail
    assert not torch.equal(y[idx], y)
    wrong, _ = _expected_losses(method, net, x, y, ctx_for(8, 11), labels=y[idx])
    assert abs(float(sum(w.detach() for w in wrong)) - float(out.loss.detach())) > 1e-3


def test_each_members_loss_reaches_only_its_own_weights() -> None:
    """∂(Σ L)/∂θ_i equals ∂L_i/∂θ_i: the distilled images are constants, nothing leaks across members."""
    method = make(eps=0.1, step_size=0.02, steps=3)
    net = tiny_net(method)
    x, y = batch(8)
    out = method.loss(net, x, y, ctx_for(8, 5))
    members = net.trainable()
    params = [list(m.parameters()) for m in members]
    total = torch.autograd.grad(out.loss, [p for ps in params for p in ps])
    expected, _ = _expected_losses(method, net, x, y, ctx_for(8, 5))
    k = 0
    for i, ps in enumerate(params):
        own = torch.autograd.grad(expected[i], ps)
        for p_own in own:
            assert torch.allclose(total[k], p_own, atol=1e-6)
            k += 1
        others = [p for j, q in enumerate(params) if j != i for p in q]
        cross = torch.autograd.grad(expected[i], others, allow_unused=True)
        assert all(c is None or not c.abs().any() for c in cross)


def test_one_optimizer_with_member_groups_equals_one_optimizer_per_member() -> None:
    """Two Adam steps: the loop's single optimiser over per-member groups vs the paper's N optimisers
    stepped one member after the other, on the same distilled batches."""
    from ensemble_core.spec import OptimizerSpec

    method = make(eps=0.1, step_size=0.02, steps=2)
    net_a, net_b = tiny_net(method), tiny_net(method)
    groups = method.param_groups(net_a, 1e-2, 1e-4)
    assert len(groups) == 3
    for g, m in zip(groups, net_a.trainable(), strict=True):
        assert [id(p) for p in g["params"]] == [id(p) for p in m.parameters()]
    opt_a = make_optimizer(groups, OptimizerSpec(name="adam", lr=1e-2, weight_decay=1e-4))
    opts_b = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in net_b.trainable()]
    for step in range(2):
        x, y = batch(8, seed=step)
        out = method.loss(net_a, x, y, ctx_for(8, 20, step=step))
        opt_a.zero_grad()
        out.loss.backward()
        opt_a.step()
        # all distilled images are crafted before any member steps, as in the released code
        expected, _ = _expected_losses(method, net_b, x, y, ctx_for(8, 20, step=step))
        for i, opt in enumerate(opts_b):
            opt.zero_grad()
            expected[i].backward()
            opt.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_plus_clean_and_plus_adv_add_their_terms() -> None:
    x, y = batch(8)
    base = make(eps=0.1, step_size=0.02, steps=2)
    net = tiny_net(base)
    plain = float(base.loss(net, x, y, ctx_for(8, 3)).loss.detach())
    clean = make(eps=0.1, step_size=0.02, steps=2, plus_clean=True, coeff=2.0)
    out = clean.loss(net, x, y, ctx_for(8, 3))
    with torch.no_grad():
        ce = float(sum(F.cross_entropy(m(x), y) for m in net.trainable()))
    assert float(out.loss.detach()) == pytest.approx(2.0 * plain + ce, rel=1e-6)
    adv = make(eps=0.1, step_size=0.02, steps=2, plus_adv=True, adv_eps=0.1, adv_step_size=0.05, adv_steps=2)
    out_adv = adv.loss(net, x, y, ctx_for(8, 3))
    assert out_adv.terms["adv_ce"] > 0
    assert float(out_adv.loss.detach()) == pytest.approx(plain + out_adv.terms["adv_ce"].item(), rel=1e-6)


def test_start_from_baseline_adds_a_plain_ce_stage() -> None:
    method = make(start_from="baseline")
    assert [s.name for s in method.stages()] == ["baseline", "dverge"]
    net = TrainNet([Tiny(s) for s in range(3)], {}, method)
    net.set_stage(method.stages()[0])
    x, y = batch(8)
    out = method.loss(net, x, y, ctx_for(8, 0))
    with torch.no_grad():
        ce = float(sum(F.cross_entropy(m(x), y) for m in net.members))
    assert float(out.loss.detach()) == pytest.approx(ce, rel=1e-6)
    assert method.step_cost(method.stages()[0]) == {"fwd_bwd": 3.0}
    assert [s.name for s in make().stages()] == ["dverge"]


# ------------------------------------------------------------------------------------- configuration


def test_distillation_defaults_per_data_set() -> None:
    assert resolve_distillation("cifar10", None, None)[:2] == (0.07, 0.007)
    assert resolve_distillation("mnist", None, None)[:2] == pytest.approx((8 / 255, 2 / 255))
    assert resolve_distillation("fashion_mnist", None, None)[:2] == pytest.approx((8 / 255, 2 / 255))
    assert resolve_distillation("mnist", 0.1, None)[:2] == pytest.approx((0.1, 0.025))  # the step ratio is kept
    assert resolve_distillation("cifar10", 0.05, 0.01)[:2] == (0.05, 0.01)
    assert make(dataset="cifar10").distillation.eps == 0.07


@pytest.mark.parametrize(("hp", "field"), [
    ({"eps": 1.5}, "eps"), ({"steps": 0}, "steps"), ({"layer": 0}, "layer"), ({"momentum": -1}, "momentum"),
    ({"eps": 0.05, "step_size": 0.1}, "step_size"), ({"adv_eps": 0.01, "adv_step_size": 0.02}, "adv_step_size"),
    ({"start_from": "pretrained"}, "start_from"), ({"distill_bn_mode": "test"}, "distill_bn_mode"),
    ({"zeta": 1}, "zeta"), ({"coeff": 0}, "coeff"),
])
def test_invalid_hyperparameters_name_the_field(hp: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make(**hp)


def test_a_layer_beyond_the_architecture_and_too_few_members_are_refused() -> None:
    method = make(layer=3)  # Tiny has two weighted layers
    net = tiny_net(method)
    x, y = batch(8)
    with pytest.raises(ValueError, match="layer: 3 exceeds the 2"):
        method.loss(net, x, y, ctx_for(8, 0))
    assert "members" in (method_constraints("dverge", 1, {}) or "")
    assert method_constraints("dverge", 2, {}) is None


def test_step_cost_counts_the_passes() -> None:
    stage = make().stages()[0]
    assert make().step_cost(stage) == {"fwd": 3.0, "input_grad": 30.0, "fwd_bwd": 6.0}
    both = make(plus_adv=True, plus_clean=True, steps=5, adv_steps=7)
    assert both.step_cost(stage) == {"fwd": 3.0, "input_grad": 15.0 + 21.0, "fwd_bwd": 6.0 + 3.0 + 3.0}


def test_describe_lists_every_hyperparameter_with_its_default() -> None:
    d = next(m for m in describe_methods() if m["name"] == "dverge")
    assert d["default_combine"] == "mean_probs" and d["min_members"] == 2
    hp = d["hyperparameters"]
    assert set(hp) == {"eps", "step_size", "steps", "momentum", "random_start", "layer", "distill_bn_mode",
                       "coeff", "plus_adv", "adv_eps", "adv_step_size", "adv_steps", "plus_clean", "start_from",
                       "features"}
    assert hp["features"]["default"] == "pre_relu" and hp["features"]["enum"] == ["pre_relu", "post_relu"]
    assert hp["steps"]["default"] == 10 and hp["momentum"]["default"] == 1.0 and hp["layer"]["default"] is None
    assert hp["random_start"]["default"] is False and hp["start_from"]["default"] == "scratch"
    assert hp["adv_eps"]["default"] == pytest.approx(8 / 255)
    assert all(v["description"] for v in hp.values())


def test_results_report_the_setting_and_the_distilled_cross_accuracy() -> None:
    method = make(members=2, steps=2)
    members = [build_model("lenet5", num_classes=10) for _ in range(2)]
    net = TrainNet(members, {}, method)
    out = method.results(net, synthetic_dataset(40, seed=1), torch.device("cpu"))
    assert out["distillation"]["depth"] == 5 and out["distillation"]["steps"] == 2
    acc = out["distilled_accuracy"]
    assert acc["images"] == 40 and len(acc["matrix"]) == 2 and all(len(r) == 2 for r in acc["matrix"])
    assert 0.0 <= acc["mean_cross"] <= 1.0
