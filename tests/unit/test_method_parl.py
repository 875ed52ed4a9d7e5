"""PARL (spec parl §2): layer saliency maps, the pairwise cosine penalty, the total loss, gradient flow,
hyperparameter validation, inference rules and DDP equivalence.

The hand-computed cases use single-conv members whose first-layer map is known in closed form: each
pixel receives the sum of the kernel weights covering it (spec §2.3).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pydantic import ValidationError
from torch import nn

from ensemble_core.ensemble import Ensemble, combine_rule
from ensemble_core.methods import describe_methods, get_method, method_names
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.parl import (
    PARL,
    LayerTaps,
    conv_layer_count,
    layer_saliency,
    pairwise_cosines,
    parl_penalty,
    saliency_maps,
)
from ensemble_core.models import MemberNet, build_model
from ensemble_core.spec import TrainSpec

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- tiny members


class TinyConvNet(MemberNet):
    """conv1 (1→1, 2×2, no bias) [→ ReLU] → conv2 (1→1, 1×1 scalar c, no bias) → linear head (zeros)."""

    def __init__(self, kernel: list[list[float]], c: float = 1.0, relu: bool = False, classes: int = 10,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(1, 1, 1, bias=False)
        self.relu = relu
        self.classifier = nn.Linear(4, classes)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor(kernel).view(1, 1, 2, 2))
            self.conv2.weight.fill_(c)
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
        self.to(dtype)
        self.mean, self.std = self.mean.to(dtype), self.std.to(dtype)
        self.feature_dim, self.num_classes = 4, classes
        self._taps = [self.conv1, self.conv2]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv1(z)
        if self.relu:
            h = torch.relu(h)
        return self.conv2(h).flatten(1)


class TwoConvNet(MemberNet):
    """conv(1→2, 3×3) → ReLU → conv(2→2, 3×3) → ReLU → linear: the gradcheck network (spec §2.8)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 3)
        self.classifier = nn.Linear(2 * 2 * 2, 3)
        self.feature_dim, self.num_classes = 8, 3
        self._taps = [self.conv1, self.conv2]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(z)))).flatten(1)


A = [[1.0, 0.0], [0.0, 0.0]]
B = [[0.0, 0.0], [0.0, 1.0]]
C = [[1.0, 2.0], [0.0, 0.0]]
# First-layer maps on a 3×3 input, by hand: pixel (i, j) gets Σ w[i-p][j-q] over output positions (p, q).
MAP_A = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
MAP_B = [[0, 0, 0], [0, 1, 1], [0, 1, 1]]
MAP_C = [[1, 3, 2], [1, 3, 2], [0, 0, 0]]
COS_AB = 1 / (2 * 2)  # one shared pixel; |A| = |B| = 2
COS_AC = 8 / (2 * math.sqrt(28))  # <A, C> = 1+3+1+3; |C|² = 2·(1+9+4)
COS_BC = 5 / (2 * math.sqrt(28))  # <B, C> = 3+2


def make_method(arch: str = "lenet5", members: int = 3, **hp: object) -> PARL:
    return PARL.from_spec_dict(dict(hp), members=members, num_classes=10, dataset="mnist",  # type: ignore[return-value]
                               architecture=arch)


def ctx_for(batch: int) -> StepContext:
    return StepContext(0, 0, 0, 0, 1, batch, 0, torch.Generator().manual_seed(0), torch.device("cpu"))


def members_of(arch: str, n: int, **kw: object) -> list[MemberNet]:
    out = []
    for k in range(n):
        torch.manual_seed(100 + k)
        out.append(build_model(arch, **kw))  # type: ignore[arg-type]
    return out


# -------------------------------------------------------------------------- hand-computed values


def test_first_layer_maps_match_the_hand_computed_kernel_coverage() -> None:
    nets = [TinyConvNet(A), TinyConvNet(B), TinyConvNet(C)]
    x = torch.rand(2, 1, 3, 3)
    _, maps = saliency_maps(nets, x, K=1)
    for m, expected in zip(maps, (MAP_A, MAP_B, MAP_C), strict=True):
        assert torch.equal(m[0], torch.tensor(expected, dtype=torch.float32).flatten().repeat(2, 1))


def test_penalty_and_total_loss_equal_the_hand_computed_values() -> None:
    nets = [TinyConvNet(A), TinyConvNet(B), TinyConvNet(C)]
    x = torch.rand(4, 1, 3, 3)
    _, maps = saliency_maps(nets, x, K=1)
    pen, cos = parl_penalty(maps)
    assert cos.shape == (3, 1)
    assert torch.allclose(cos[:, 0], torch.tensor([COS_AB, COS_AC, COS_BC]), atol=1e-6)  # pairs 01, 02, 12
    assert pen.item() == pytest.approx(COS_AB + COS_AC + COS_BC, abs=1e-6)

    method = make_method("lenet5", K=1, gamma1=0.7, gamma2=0.3)
    net = TrainNet(nets, {}, method)
    out = net(x, torch.tensor([0, 3, 5, 9]), ctx_for(4))
    ce_each = math.log(10)  # zero head: uniform logits
    assert out.terms["ce"].item() == pytest.approx(3 * ce_each, abs=1e-6)
    assert out.terms["penalty"].item() == pytest.approx(COS_AB + COS_AC + COS_BC, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.7 * 3 * ce_each + 0.3 * (COS_AB + COS_AC + COS_BC), abs=1e-5)
    assert out.terms["cos_0_2_l1"].item() == pytest.approx(COS_AC, abs=1e-6)


def test_second_layer_signs_and_the_sum_or_mean_switch() -> None:
    # Linear conv2 = scalar c: map_2 = c · map_1, so cos_2(i, j) = sign(c_i c_j) · cos_1(i, j).
    nets = [TinyConvNet(A, c=2.0), TinyConvNet(B, c=-1.0), TinyConvNet(C, c=0.5)]
    x = torch.rand(3, 1, 3, 3)
    _, maps = saliency_maps(nets, x, K=2)
    assert torch.allclose(maps[1][1], -maps[1][0]) and torch.allclose(maps[0][1], 2 * maps[0][0])
    pen_sum, cos = parl_penalty(maps, "sum")
    expected = torch.tensor([[COS_AB, -COS_AB], [COS_AC, COS_AC], [COS_BC, -COS_BC]])
    assert torch.allclose(cos, expected, atol=1e-6)
    assert pen_sum.item() == pytest.approx(2 * COS_AC, abs=1e-6)  # pairs 01 and 12 cancel over layers
    pen_mean, _ = parl_penalty(maps, "mean")
    assert pen_mean.item() == pytest.approx(COS_AC, abs=1e-6)


def test_deeper_maps_are_per_sample_through_the_relu_mask() -> None:
    # conv1 = w00 only, so conv1 output (p, q) = x[p, q]; ReLU keeps the positive ones; map_2 pixel
    # (i, j) = c · [x[i, j] > 0] on the top-left 2×2 block.
    net = TinyConvNet(A, c=3.0, relu=True)
    x = torch.ones(2, 1, 3, 3)
    x[1, 0, 0, 0] = -1.0  # sample 1: position (0, 0) inactive
    _, maps = saliency_maps([net, TinyConvNet(B)], x, K=2)
    m2 = maps[0][1].view(2, 3, 3)
    assert torch.equal(m2[0], 3.0 * torch.tensor(MAP_A, dtype=torch.float32))
    expected1 = 3.0 * torch.tensor(MAP_A, dtype=torch.float32)
    expected1[0, 0] = 0.0
    assert torch.equal(m2[1], expected1)
    cos = pairwise_cosines(maps)[0, 1]  # pair (0, 1), layer 2, per sample
    # sample 1: <A', B> = 1 (pixel (1, 1) survives), |A'| = √3, |B| = 2
    assert cos[0].item() == pytest.approx(0.25, abs=1e-6)
    assert cos[1].item() == pytest.approx(1 / (2 * math.sqrt(3)), abs=1e-6)


# ------------------------------------------------------------------------- spec §2.8 unit tests


@pytest.mark.parametrize("arch, K, kw", [("lenet5", 2, {}), ("resnet20", 7, {"in_channels": 3})])
def test_identical_members_give_penalty_K_times_pairs(arch: str, K: int, kw: dict) -> None:
    nets = members_of(arch, 3, **kw)
    for m in nets[1:]:
        m.load_state_dict(nets[0].state_dict())
    for m in nets:
        m.train()
    c = kw.get("in_channels", 1)
    x = torch.rand(3, c, 16 if arch == "resnet20" else 28, 16 if arch == "resnet20" else 28)
    _, maps = saliency_maps(nets, x, K)
    pen, cos = parl_penalty(maps)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert pen.item() == pytest.approx(K * 3, abs=1e-4)  # K · N(N-1)/2


@pytest.mark.parametrize("arch, c, s", [("lenet5", 1, 28), ("resnet20", 3, 16), ("dkd_mnist", 1, 28)])
def test_first_layer_map_is_input_independent_and_deeper_ones_are_not(arch: str, c: int, s: int) -> None:
    nets = members_of(arch, 2, in_channels=c, image_size=s)
    x = torch.rand(4, c, s, s)
    _, maps = saliency_maps(nets, x, K=2)
    for m in maps:
        assert torch.allclose(m[0], m[0][:1].expand_as(m[0]), atol=1e-6)
        assert not torch.allclose(m[1], m[1][:1].expand_as(m[1]), atol=1e-4)


def test_bn_trap_post_bn_map_is_zero_and_a_bn_tap_is_refused() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn.train()
    x = torch.rand(8, 1, 10, 10, requires_grad=True)
    pre = conv(x)
    post = bn(pre)
    g_post = layer_saliency(post, x)
    g_pre = layer_saliency(pre, x)
    # spec §2.3: exactly zero up to rounding
    assert g_post.abs().max().item() < 1e-4 * g_pre.abs().max().item()
    # The method refuses such a tap: a BatchNorm module, or a module whose output comes from a train-mode BN.
    for tapped in (bn, nn.Sequential(conv, bn)):
        with pytest.raises(ValueError, match="train-mode BatchNorm"), LayerTaps([tapped]):
            (nn.Sequential(conv, bn) if tapped is bn else tapped)(x)
    bn.eval()  # eval-mode BN is an affine map: its summed output has a non-zero input gradient
    with LayerTaps([bn]) as t:
        bn(conv(x))
    assert layer_saliency(t.outputs()[0], x).abs().max() > 0


def test_every_architectures_taps_are_raw_conv_outputs_with_non_zero_maps() -> None:
    for arch, c, s, K in [("resnet20", 3, 16, 7), ("resnet18", 3, 16, 5), ("lenet5", 1, 28, 2)]:
        nets = members_of(arch, 2, in_channels=c, image_size=s)
        for m in nets:
            m.train()
            assert all(isinstance(t, nn.Conv2d) for t in m.conv_taps()[:K])
        _, maps = saliency_maps(nets, torch.rand(2, c, s, s), K)
        assert all(mk.norm(dim=1).min() > 0 for m in maps for mk in m), arch


def test_gradcheck_of_the_penalty_wrt_a_conv_weight() -> None:
    nets = [TwoConvNet(1).double(), TwoConvNet(2).double()]
    for n in nets:
        n.mean, n.std = n.mean.double(), n.std.double()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    w0 = nets[0].conv1.weight.detach().clone().requires_grad_(True)
    w1 = nets[0].conv2.weight.detach().clone().requires_grad_(True)

    def penalty(conv1_w: torch.Tensor, conv2_w: torch.Tensor) -> torch.Tensor:
        # saliency_maps calls the modules themselves: swap the weights in for the duration of the call
        with _swapped(nets[0], {"conv1.weight": conv1_w, "conv2.weight": conv2_w}):
            _, maps = saliency_maps(nets, x, K=2)
        return parl_penalty(maps)[0]

    assert torch.autograd.gradcheck(penalty, (w0, w1), eps=1e-6, atol=1e-6)


class _swapped:
    """Temporarily replace parameters of ``module`` by given tensors (kept in the autograd graph)."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.module, self.tensors = module, tensors
        self.saved: dict[str, nn.Parameter] = {}

    def __enter__(self) -> None:
        for name, t in self.tensors.items():
            mod_name, _, attr = name.rpartition(".")
            mod = self.module.get_submodule(mod_name)
            self.saved[name] = mod._parameters[attr]  # type: ignore[assignment]
            del mod._parameters[attr]
            setattr(mod, attr, t)

    def __exit__(self, *exc: object) -> None:
        for name, p in self.saved.items():
            mod_name, _, attr = name.rpartition(".")
            mod = self.module.get_submodule(mod_name)
            delattr(mod, attr)
            mod._parameters[attr] = p


def test_three_pair_cosine_sum_is_at_least_minus_one_and_a_half() -> None:
    g = torch.Generator().manual_seed(0)
    for d in (2, 3, 50, 784):
        maps = [[torch.randn(256, d, generator=g)] for _ in range(3)]
        per_sample = pairwise_cosines(maps)[:, 0, :].sum(0)  # (B,) three-pair sum for one layer
        assert per_sample.min().item() >= -1.5 - 1e-6
    # the bound is attained by three unit vectors at 120° (sum zero)
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    maps = [[torch.stack([torch.cos(a), torch.sin(a)]).view(1, 2)] for a in angles]
    assert parl_penalty(maps)[0].item() == pytest.approx(-1.5, abs=1e-6)
    # and on random data through real members
    nets = members_of("lenet5", 3)
    _, maps = saliency_maps(nets, torch.rand(16, 1, 28, 28), K=2)
    assert (pairwise_cosines(maps).sum(0) >= -1.5 - 1e-5).all()


def test_gamma2_zero_is_exactly_independent_ce_training() -> None:
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    grads = {}
    for name, hp in (("parl", {"gamma2": 0.0}), ("baseline", {})):
        nets = members_of("lenet5", 3)
        method = get_method(name).from_spec_dict(hp, members=3, num_classes=10, dataset="mnist",
                                                 architecture="lenet5")
        net = TrainNet(nets, {}, method)
        out = net(x, y, ctx_for(8))
        out.loss.backward()
        grads[name] = (out.loss.detach(), [p.grad.clone() for p in net.parameters()])
        if name == "parl":
            assert "penalty" not in out.terms
    assert torch.equal(grads["parl"][0], grads["baseline"][0])
    assert all(torch.equal(a, b) for a, b in zip(grads["parl"][1], grads["baseline"][1], strict=True))


# --------------------------------------------------------------------- which parameters learn what


def _penalty_grads(nets: list[MemberNet], x: torch.Tensor, K: int) -> list[dict[str, torch.Tensor | None]]:
    for m in nets:
        m.zero_grad(set_to_none=True)
    _, maps = saliency_maps(nets, x, K)
    parl_penalty(maps)[0].backward()
    return [{n: p.grad for n, p in m.named_parameters()} for m in nets]


def _has(g: torch.Tensor | None) -> bool:
    return g is not None and g.abs().sum().item() > 0


def test_penalty_reaches_exactly_the_conv_weights_up_to_tap_K_in_both_members() -> None:
    nets = members_of("lenet5", 2)
    x = torch.rand(8, 1, 28, 28)
    for K, learning in ((1, {"conv1.weight"}), (2, {"conv1.weight", "conv2.weight"})):
        for g in _penalty_grads(nets, x, K):  # both members of the pair
            assert {n for n, v in g.items() if _has(v)} == learning, K


def test_penalty_gradients_in_resnet20_stop_at_tap_K_and_spare_bn_beta() -> None:
    nets = members_of("resnet20", 2, in_channels=3)
    for m in nets:
        m.train()
    g = _penalty_grads(nets, torch.rand(4, 3, 16, 16), K=3)[1]
    got = {n for n, v in g.items() if _has(v)}
    # Taps 1-3: stem, block-1 conv1, block-1 conv2. Nothing after tap 3 (bn2, later blocks, head) learns
    # from the penalty. BN γ scales the VJP directly. bn1's β acts on the map only through the ReLU mask
    # (zero gradient), but stem_bn's β shifts the input of bn1, whose train-mode backward depends on its
    # normalised input, so it does get some gradient (spec §2.5: "almost no", not none).
    assert got == {"stem.weight", "stem_bn.weight", "stem_bn.bias", "layers.0.conv1.weight",
                   "layers.0.bn1.weight", "layers.0.conv2.weight"}
    for m in nets:
        m.eval()  # with fixed statistics, every BN β acts through ReLU masks only
    g = _penalty_grads(nets, torch.rand(4, 3, 16, 16), K=3)[0]
    assert {n for n, v in g.items() if _has(v)} == {"stem.weight", "stem_bn.weight", "layers.0.conv1.weight",
                                                    "layers.0.bn1.weight", "layers.0.conv2.weight"}


def test_the_ce_term_reaches_every_parameter_and_the_total_combines_both() -> None:
    method = make_method("lenet5", K=2, gamma1=1.0, gamma2=0.5)
    net = TrainNet(members_of("lenet5", 3), {}, method)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    out = net(x, y, ctx_for(8))
    out.loss.backward()  # one ordinary backward through the create_graph maps
    assert all(_has(p.grad) for p in net.parameters())
    total = out.terms["ce"].item() + 0.5 * out.terms["penalty"].item()
    assert out.loss.item() == pytest.approx(total, rel=1e-6)
    ce_only = [torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), m.conv1.weight)[0]
               for m in net.members]
    assert not torch.allclose(net.members[0].conv1.weight.grad, ce_only[0])  # the penalty added to it


def test_zero_map_contributes_zero_cosine_and_a_finite_gradient() -> None:
    a = torch.zeros(2, 5, requires_grad=True)
    b = torch.randn(2, 5, requires_grad=True)
    pen, cos = parl_penalty([[a], [b]])
    pen.backward()
    assert cos.item() == 0.0 and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_in_place_change_of_a_tap_output_is_refused() -> None:
    conv = nn.Conv2d(1, 2, 3)
    net = nn.Sequential(conv, nn.ReLU(inplace=True))
    with LayerTaps([conv]) as t:
        net(torch.rand(1, 1, 5, 5))
    with pytest.raises(RuntimeError, match="modified in place"):
        t.outputs()


# ----------------------------------------------------------------------- validation and registry


def test_registered_and_listed_with_meanings() -> None:
    assert "parl" in method_names()
    d = next(m for m in describe_methods() if m["name"] == "parl")
    assert d["default_combine"] == "vote" and d["min_members"] == 2
    hps = d["hyperparameters"]
    assert set(hps) == {"gamma1", "gamma2", "K", "layer_reduction", "cos_eps"}
    assert hps["gamma1"]["default"] == 1.0 and hps["gamma2"]["default"] == 0.5
    assert hps["layer_reduction"]["default"] == "sum"
    assert all(h["description"] for h in hps.values())


@pytest.mark.parametrize("arch, expected",
                         [("lenet5", 2), ("resnet20", 7), ("resnet18", 7), ("dkd_mnist", 4)])
def test_default_K_is_seven_capped_at_the_conv_count(arch: str, expected: int) -> None:
    spec = TrainSpec.model_validate({"method": "parl", "architecture": arch, "hyperparameters": {}})
    assert spec.hyperparameters["K"] == expected
    assert expected == make_method(arch).K


@pytest.mark.parametrize("hp, arch, field", [
    ({"gamma1": 0.0}, "lenet5", "hyperparameters.gamma1"),
    ({"gamma2": -0.1}, "lenet5", "hyperparameters.gamma2"),
    ({"K": 0}, "lenet5", "hyperparameters.K"),
    ({"K": 3}, "lenet5", "hyperparameters.K"),
    ({"K": 22}, "resnet20", "hyperparameters.K"),
    ({"layer_reduction": "max"}, "lenet5", "hyperparameters.layer_reduction"),
    ({"cos_eps": 0.0}, "lenet5", "hyperparameters.cos_eps"),
    ({"gama2": 1.0}, "lenet5", "hyperparameters.gama2"),
])
def test_out_of_range_hyperparameters_name_the_field(hp: dict, arch: str, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "parl", "architecture": arch, "hyperparameters": hp})
    assert field in [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]


def test_K_bounds_per_architecture_and_the_constructor_check() -> None:
    assert conv_layer_count("lenet5") == 2 and conv_layer_count("resnet20") == 21  # 19 convs + 2 shortcuts
    TrainSpec.model_validate({"method": "parl", "architecture": "resnet20", "hyperparameters": {"K": 21}})
    with pytest.raises(ValueError, match="hyperparameters.K"):
        make_method("lenet5", K=3)
    with pytest.raises(ValidationError, match="at least 2 members"):
        TrainSpec.model_validate({"method": "parl", "members": 1})


# ---------------------------------------------------------------------------------- inference


def test_vote_is_the_default_rule_and_attacks_use_its_surrogate() -> None:
    assert make_method().combine() == "vote"
    ens = Ensemble(members_of("lenet5", 3), make_method().combine())
    assert ens.attack_target().combine == "log_mean_probs"
    assert TrainSpec.model_validate({"method": "parl", "combine": "mean_logits"}).combine == "mean_logits"


def test_vote_tiebreak_falls_back_to_the_mean_softmax() -> None:
    # sample 0: members vote 1, 1, 2 → majority 1; sample 1: 0, 1, 2 → no majority, mean softmax → 2
    z = torch.tensor([[[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]],
                      [[0.0, 5.0, 0.0], [0.0, 3.1, 0.0]],
                      [[0.0, 0.0, 5.0], [0.0, 0.0, 9.0]]])
    assert combine_rule("vote").predict_labels(z).tolist() == [1, -1]
    assert combine_rule("vote_tiebreak").predict_labels(z).tolist() == [1, 2]
    assert combine_rule("vote_tiebreak").attack_surrogate == "log_mean_probs"


def test_results_report_cosines_and_cka() -> None:
    from ensemble_core.data import synthetic_dataset

    nets = members_of("lenet5", 3)
    nets[2].load_state_dict(nets[0].state_dict())
    method = make_method("lenet5")
    res = method.results(TrainNet(nets, {}, method), synthetic_dataset(40), torch.device("cpu"), n_images=40)
    assert res["K"] == 2 and res["n_images"] == 40
    assert res["eval_cosine"]["0-2"] == pytest.approx([1.0, 1.0], abs=1e-5)  # identical members
    assert res["cka_conv_layers"]["0-2"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(0.0 <= v <= 1.0 + 1e-9 for vals in res["cka_conv_layers"].values() for v in vals)


# ------------------------------------------------------------------- DDP: 2 gloo ranks = 1 process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    method = make_method("lenet5", K=2)
    net = TrainNet(members_of("lenet5", 3), {}, method)
    model: nn.Module = DDP(net) if world > 1 else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    share = 8 // world
    lo = rank * share
    ctx = StepContext(0, 0, 0, rank, world, 8, lo, torch.Generator().manual_seed(0), torch.device("cpu"))
    out = model(x[lo : lo + share], y[lo : lo + share], ctx)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    if rank == 0:
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, Path(out_dir) / f"w{world}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process() -> None:
    """Input-gradient maps via autograd.grad inside DDP's forward, then one backward (spec §9)."""
    with tempfile.TemporaryDirectory() as d:
        _one_step(0, 1, 0, d)
        mp.spawn(_one_step, args=(2, _free_port(), d), nprocs=2, join=True)
        one, two = torch.load(Path(d) / "w1.pt"), torch.load(Path(d) / "w2.pt")
    before = TrainNet(members_of("lenet5", 3), {}, make_method("lenet5", K=2)).state_dict()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k
        if k.endswith("conv1.weight"):
            assert not torch.allclose(one[k], before[k])  # the step did move the weights


# ------------------------------------------------------------------------------ real MNIST, briefly


@pytest.mark.integration
@pytest.mark.slow
def test_short_mnist_run_lowers_the_cosines_and_deploys_a_vote(tmp_path: Path) -> None:
    """Spec §9: the cosines fall quickly below their initial values; the saved ensemble votes."""
    from ensemble_core.checkpoint import load_ensemble
    from ensemble_core.data import load_dataset
    from ensemble_core.training import train_local

    spec = {"method": "parl", "dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": 2,
            "batch_size": 64, "train_subset": 1024, "eval_subset": 500, "seed": 0,
            "hyperparameters": {"K": 2}}
    result, path = train_local(spec, tmp_path, progress=False, log=lambda s: None)
    hist = result.history
    assert {"train_penalty", "train_ce", "train_cos_0_1_l1", "train_cos_1_2_l2"} <= set(hist[0])
    assert hist[1]["train_penalty"] < hist[0]["train_penalty"]
    # the penalty at the initial weights (same seeds as the run) is higher than after training
    init = TrainNet(members_of_spec(spec), {}, make_method("lenet5", K=2))
    x = load_dataset("mnist", "train").as_float()[0][:256]
    _, maps0 = saliency_maps(list(init.members), x, 2, create_graph=False)
    ens = load_ensemble(path)
    assert ens.combine == "vote" and result.results["combine"] == "vote"
    _, maps1 = saliency_maps(list(ens.members), x, 2, create_graph=False)
    assert parl_penalty(maps1)[0] < parl_penalty(maps0)[0] - 0.5
    assert result.metrics["test_clean_acc"] > 0.8
    assert result.results["method_results"]["K"] == 2


def members_of_spec(spec: dict) -> list[MemberNet]:
    """The members ``setup_run`` builds for ``spec`` before training (same seeds)."""
    from ensemble_core.data import DATASET_INFO

    info = DATASET_INFO[spec["dataset"]]
    out = []
    for k in range(spec["members"]):
        torch.manual_seed(spec["seed"] * 1000 + k)
        out.append(build_model(spec["architecture"], num_classes=10, in_channels=info.in_channels,
                               image_size=info.image_size, mean=info.mean, std=info.std))
    return out
