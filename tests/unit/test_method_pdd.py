"""PDD + DEG (spec shared/specs/pdd.md): the dropout rule, the DEG penalty, the loss, results, validation.

Every value checked here is computed by hand or by an independent code path (separate autograd
calls, ``F.cosine_similarity``), not only "finite".
"""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ensemble_core.checkpoint import load_checkpoint, load_ensemble
from ensemble_core.data import synthetic_dataset
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods import pdd as pdd_mod
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.pdd import (
    default_intervals,
    deg_penalty,
    diversity_diagnostics,
    entropy_diversity,
    feature_discrimination,
    pairwise_cosines,
    pdd_keep_prob,
    pdd_mask,
)
from ensemble_core.models import MemberNet, build_model
from ensemble_core.spec import TrainSpec
from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble

torch.set_num_threads(1)


class SliceNet(MemberNet):
    """features = input pixels [start, start + D) (no activation), head = Linear(D, C): hand-computable."""

    def __init__(self, start: int, dim: int, classes: int) -> None:
        super().__init__()
        self.start, self.dim = start, dim
        self.classifier = nn.Linear(dim, classes)
        self.feature_dim, self.num_classes = dim, classes

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1)[:, self.start : self.start + self.dim]


def method(hp: dict, members: int, classes: int = 10):
    return get_method("pdd").from_spec_dict(hp, members=members, num_classes=classes, dataset="mnist",
                                            architecture="lenet5")


def ctx(local: int, seed: int = 0, offset: int = 0, global_size: int | None = None, world: int = 1,
        rank: int = 0) -> StepContext:
    return StepContext(0, 0, 0, rank, world, global_size or local, offset,
                       torch.Generator().manual_seed(seed), torch.device("cpu"))


def lenet_net(hp: dict, k: int = 3, seed: int = 0) -> TrainNet:
    members = []
    for i in range(k):
        torch.manual_seed(seed * 100 + i)
        members.append(build_model("lenet5"))
    return TrainNet(members, {}, method(hp, k))


def mnist_like_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = synthetic_dataset(n, seed=seed)
    return ds.images.float() / 255, ds.labels


# ------------------------------------------------------------------------------ PDD rule (spec §4)


def test_worked_example_of_spec_4_2_exactly() -> None:
    feats = torch.tensor([[[0.0, 0.1, 0.2, 0.9], [0.0, 0.05, 0.6, 1.0]]])
    p, t = pdd_keep_prob(feats, M=4, alpha=0.9, beta=0.1)
    assert t.tolist() == [[0, 3]]
    expected = torch.tensor([[[0.9, 0.9, 0.9, 0.1 * (1 - 1 / 4)], [0.1 * (1 - 2 / 4), 0.05, 0.075, 0.9]]])
    assert torch.allclose(p, expected, atol=1e-7, rtol=0)


def test_worked_example_drives_the_loss_by_hand() -> None:
    """Spec §4.2 features through two members; α=1, β=0 make the mask deterministic, so CE is by hand."""
    members = [SliceNet(0, 4, 2), SliceNet(4, 4, 2)]
    with torch.no_grad():
        members[0].classifier.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 2]]))
        members[1].classifier.weight.copy_(torch.tensor([[0.0, 0, 0, -1], [1, 1, 1, 1]]))
        for m in members:
            m.classifier.bias.zero_()
    net = TrainNet(members, {}, method({"variant": "pdd", "M": 4, "alpha": 1.0, "beta": 0.0}, 2, 2))
    x = torch.tensor([0.0, 0.1, 0.2, 0.9, 0.0, 0.05, 0.6, 1.0]).view(1, 1, 1, 8)
    y = torch.tensor([0])
    out = net(x, y, ctx(1))
    # member 1 keeps its bin-0 units [0, .1, .2] (priority t1=0): logits [0.3, 0] → CE = softplus(-0.3)
    # member 2 keeps only its bin-3 unit 1.0 (priority t2=3): logits [-1, 1] → CE = softplus(2)
    ce1, ce2 = math.log1p(math.exp(-0.3)), math.log1p(math.exp(2.0))
    assert out.terms["ce_0"].item() == pytest.approx(ce1, abs=1e-6)
    assert out.terms["ce_1"].item() == pytest.approx(ce2, abs=1e-6)
    assert out.loss.item() == pytest.approx((ce1 + ce2) / 2, abs=1e-6)  # mean over members (spec §5.1 [R])
    assert out.terms["keep_0"].item() == pytest.approx(0.75)
    assert out.terms["keep_1"].item() == pytest.approx(0.25)
    net.eval()  # spec §4.1 step 9: identity at evaluation, logits [1.2, 1.8] and [-1, 1.65]
    ev = net(x, y, ctx(1))
    assert ev.terms["ce_0"].item() == pytest.approx(math.log1p(math.exp(0.6)), abs=1e-6)
    assert ev.terms["ce_1"].item() == pytest.approx(math.log1p(math.exp(2.65)), abs=1e-6)
    assert "keep_0" not in ev.terms


@pytest.mark.parametrize("k, m, expected", [
    (3, 10, [0.53, 0.26, 0.16]),
    (5, 20, [0.36, 0.26, 0.20, 0.16, 0.13]),
])
def test_sanity_keep_rates_on_exponential_features(k: int, m: int, expected: list[float]) -> None:
    """Spec §4.4: skewed (exponential) 512-d features → member 1 keeps most, decreasing with k."""
    feats = torch.empty(400, k, 512).exponential_(generator=torch.Generator().manual_seed(0))
    p, t = pdd_keep_prob(feats, m, 0.9, 0.1)
    assert p.mean((0, 2)).tolist() == pytest.approx(expected, abs=0.015)
    assert (t[:, 0] == 0).all()  # the weakest activations are the most populated interval → member 1


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 9])
def test_any_member_count_distinct_priorities_and_valid_probabilities(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    feats = torch.relu(torch.randn(64, k, 16, generator=g))
    feats[0] = 0.5  # v = u
    feats[1] = torch.randint(0, 2, (k, 16), generator=g).float()  # only 2 non-empty intervals
    m = default_intervals(k)
    p, t = pdd_keep_prob(feats, m, 0.9, 0.1)
    assert p.shape == feats.shape and t.shape == (64, k)
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert all(len(set(row)) == k for row in t.tolist())
    assert ((t >= 0) & (t < m)).all()
    # member 1's priority interval is the most populated one (spec §4.1 step 4)
    flat = feats.reshape(64, -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    bins = ((flat - lo) * m / (hi - lo).clamp_min(1e-12)).floor().long().clamp(0, m - 1)
    counts = torch.stack([torch.bincount(b, minlength=m) for b in bins])
    assert (counts.gather(1, t[:, :1]).squeeze(1) == counts.max(1).values).all()


def test_edge_cases_constant_features_and_too_few_bins() -> None:
    """Spec §4.1 [R]: v = u puts every unit in interval 0; empty intervals are assigned lowest index first."""
    p, t = pdd_keep_prob(torch.full((1, 3, 4), 0.7), 10, 0.9, 0.1)
    assert t.tolist() == [[0, 1, 2]]
    assert p[0, 0].tolist() == pytest.approx([0.9] * 4)
    assert p[0, 1:].abs().max().item() == 0.0  # β·(1 − 4/4): the others keep nothing
    feats = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])  # intervals 0 (4 units) and 9 (2 units)
    p, t = pdd_keep_prob(feats, 10, 0.9, 0.1)
    assert t.tolist() == [[0, 9, 1]]
    assert p[0, 2].tolist() == pytest.approx([0.0, 0.0])  # member 3: all units in interval 0, density 1


def test_tie_break_follows_the_reference() -> None:
    """Equal counts: the interval whose first unit (member 1's units first) comes later ranks higher."""
    feats = torch.tensor([[[0.0, 1.0], [0.6, 0.0]]])  # intervals: [0, 3 | 2, 0]; counts 2, -, 1, 1
    _, t = pdd_keep_prob(feats, 4, 0.9, 0.1)
    assert t.tolist() == [[0, 2]]  # interval 2 first appears at position 2, interval 3 at position 1


def test_mask_is_bernoulli_of_the_keep_probability() -> None:
    feats = torch.relu(torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(1)))
    uniform = torch.rand(4, 3, 32, generator=torch.Generator().manual_seed(2))
    mask, p, _ = pdd_mask(feats, uniform, 10, 0.9, 0.1)
    assert torch.equal(mask, (uniform < p).float())
    draws = torch.rand(20000, 4, 3, 32, generator=torch.Generator().manual_seed(3))
    freq = (draws < p).float().mean(0)
    assert (freq - p).abs().max().item() < 0.015


def test_mask_is_a_constant_and_kept_units_pass_the_upstream_gradient() -> None:
    """Spec §4.4: the mask receives no gradient; d(head(h ⊙ b))/dh = upstream ⊙ b."""
    feats = torch.relu(torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    mask, p, _ = pdd_mask(feats, torch.rand(5, 3, 8, generator=torch.Generator().manual_seed(1)), 6, 0.9, 0.1)
    assert not mask.requires_grad and not p.requires_grad
    upstream = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((feats * mask * upstream).sum(), feats)
    assert torch.equal(grad, upstream * mask)
    assert torch.equal(grad[mask.bool()], upstream[mask.bool()])


def test_mask_path_has_no_host_sync_and_no_numpy() -> None:
    """Meta tensors have no data: any .item(), .tolist(), numpy or Python branch on values would raise."""
    feats = torch.empty(8, 5, 64, device="meta")
    mask, p, t = pdd_mask(feats, torch.empty(8, 5, 64, device="meta"), 20, 0.9, 0.1)
    assert mask.device.type == "meta" and p.shape == (8, 5, 64) and t.shape == (8, 5)
    members = [build_model("lenet5").to("meta") for _ in range(3)]
    net = TrainNet(members, {}, method({}, 3))
    x = torch.empty(4, 1, 28, 28, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    out = net(x, y, StepContext(0, 0, 0, 0, 1, 4, 0, torch.Generator().manual_seed(0), torch.device("meta")))
    out.loss.backward()  # the whole PDD+DEG step, double backprop included, runs without touching values
    tree = ast.parse(inspect.getsource(pdd_mod))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("numpy" in (name or "") for name in imported)


def test_masks_come_from_the_global_batch_draw() -> None:
    """Two ranks with halves of the global batch get the same masks, losses and gradients as one process."""
    net = lenet_net({"variant": "pdd_deg"})
    x, y = mnist_like_batch(6)
    params = list(net.parameters())
    full = net(x, y, ctx(6, seed=7))
    g_full = torch.autograd.grad(full.loss, params)
    halves = [net(x[r * 3:(r + 1) * 3], y[r * 3:(r + 1) * 3], ctx(3, 7, r * 3, 6, 2, r)) for r in range(2)]
    g_half = [torch.autograd.grad(h.loss, params) for h in halves]
    assert full.loss.item() == pytest.approx((halves[0].loss.item() + halves[1].loss.item()) / 2, abs=1e-6)
    for k in ("keep_0", "keep_1", "keep_2"):
        mean_half = (halves[0].terms[k] + halves[1].terms[k]).item() / 2
        assert full.terms[k].item() == pytest.approx(mean_half, abs=1e-6)
    for a, b0, b1 in zip(g_full, *g_half, strict=True):
        assert torch.allclose(a, (b0 + b1) / 2, atol=1e-6, rtol=1e-4)
    other = net(x, y, ctx(6, seed=8))  # another step's generator: other masks
    assert other.loss.item() != pytest.approx(full.loss.item(), abs=1e-6)


# ------------------------------------------------------------------------------ DEG (spec §5.2)


def linear_members(diffs: list[tuple[float, float]]) -> list[MemberNet]:
    """Binary linear members on 2 pixels whose input gradient is a positive multiple of W_1 − W_0."""
    members = []
    for d in diffs:
        m = SliceNet(0, 2, 2)
        with torch.no_grad():
            m.classifier.weight.copy_(torch.tensor([[0.0, 0.0], list(d)]))
            m.classifier.bias.copy_(torch.tensor([0.3, -0.2]))
        members.append(m)
    return members


def test_deg_hand_computed_on_linear_members() -> None:
    """∂CE/∂x = Wᵀ(p − e_y) = ±p_other·(W_1 − W_0): cos = cos(d_1, d_2) = 1/√2 for every sample."""
    lam = 0.25
    members = linear_members([(1.0, 0.0), (1.0, 1.0)])
    net = TrainNet(members, {}, method({"variant": "deg", "lam": lam}, 2, 2))
    x = torch.rand(5, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0, 1])
    out = net(x, y, ctx(5))
    ce = [F.cross_entropy(m(x), y).item() for m in members]
    assert out.terms["deg"].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(ce) / 2 + lam / math.sqrt(2), abs=1e-6)
    # both members' heads receive gradient from the DEG term (spec §5.2), and none is left in .grad
    assert all(p.grad is None for p in net.parameters())
    base = TrainNet(members, {}, method({"variant": "baseline"}, 2, 2))(x, y, ctx(5))
    for m in members:
        w = m.classifier.weight
        (g_deg,) = torch.autograd.grad(out.loss - base.loss, w, retain_graph=True)
        assert g_deg.abs().sum().item() > 1e-4


def test_deg_bounds_of_spec_14_2() -> None:
    """L_g ∈ [−K/2, K(K−1)/2]: a regular simplex gives the minimum, identical gradients the maximum."""
    c, s = -0.5, math.sqrt(3) / 2
    members = linear_members([(1.0, 0.0), (c, s), (c, -s)])
    net = TrainNet(members, {}, method({"variant": "deg"}, 3, 2))
    x = torch.rand(4, 1, 1, 2, generator=torch.Generator().manual_seed(1))
    out = net(x, torch.tensor([0, 1, 0, 1]), ctx(4))
    assert out.terms["deg"].item() == pytest.approx(-1.5, abs=1e-6)
    for k in (2, 3, 5, 8):
        g = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(k))
        assert deg_penalty([g] * k).item() == pytest.approx(k * (k - 1) / 2, abs=1e-5)
        simplex = torch.eye(k) - 1.0 / k  # k vectors summing to 0 with equal norms: pairwise cos −1/(k−1)
        lowest = deg_penalty([simplex[i].expand(3, k) for i in range(k)])
        assert lowest.item() == pytest.approx(-k / 2, abs=1e-5)
        rnd = deg_penalty([torch.randn(50, 3, 2, 2, generator=torch.Generator().manual_seed(10 + i))
                           for i in range(k)])
        assert -k / 2 - 1e-6 <= rnd.item() <= k * (k - 1) / 2 + 1e-6
    zero = deg_penalty([torch.zeros(2, 3), torch.ones(2, 3)])  # a zero gradient: cos 0, no NaN
    assert zero.item() == 0.0


def test_deg_cosine_is_exact_for_confident_members_and_gradients_stay_finite() -> None:
    """Logit gaps of ~15.5 with weights of 1e-3 give input gradients g = (p_1 − 1)·W_1 of norm ~2e-10:
    the cosine must still be 1/√2 (an ε of 1e-12 on the product of norms would report ~1e-7) and the
    double-backward gradients must be finite."""
    members = linear_members([(1e-3, 0.0), (1e-3, 1e-3)])
    for m in members:
        with torch.no_grad():
            m.classifier.bias.zero_()
    net = TrainNet(members, {}, method({"variant": "deg", "lam": 1.0}, 2, 2))
    x = torch.stack([torch.full((6,), 15_500.0), torch.rand(6, generator=torch.Generator().manual_seed(0))], 1)
    x = x.view(6, 1, 1, 2)
    y = torch.ones(6, dtype=torch.long)
    norms = []
    for m in members:
        xl = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xl), y, reduction="sum"), xl)
        norms.append(g.flatten(1).norm(dim=1))
    assert (norms[0] * norms[1]).max().item() < 1e-12 and (norms[0] > 0).all() and (norms[1] > 0).all()
    out = net(x, y, ctx(6))
    assert out.terms["deg"].item() == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    params = list(net.parameters())
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.loss, params))
    assert pairwise_cosines([torch.zeros(2, 3), torch.full((2, 3), 1e-30)]).abs().max().item() == 0.0


def test_pairwise_cosines_match_torch_cosine_similarity() -> None:
    g = [torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cos = pairwise_cosines(g)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    for col, (i, j) in enumerate(pairs):
        expected = F.cosine_similarity(g[i].flatten(1), g[j].flatten(1), dim=1)
        assert torch.allclose(cos[:, col], expected, atol=1e-6)


def reference_pdd_free_loss(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                            lam: float) -> torch.Tensor:
    """Spec §5.2 the slow way: K separate autograd.grad calls of the batch-mean CE w.r.t. one shared x."""
    xl = x.clone().requires_grad_(True)
    ces = [F.cross_entropy(m(xl), y) for m in members]
    grads = [torch.autograd.grad(c, xl, create_graph=True)[0].flatten(1) for c in ces]
    lg = sum(F.cosine_similarity(grads[i], grads[j], dim=1, eps=1e-20).mean()
             for i in range(len(members)) for j in range(i + 1, len(members)))
    return torch.stack(ces).mean() + lam * lg


def test_deg_loss_and_gradients_match_separate_grad_calls_and_reach_the_convs() -> None:
    net = lenet_net({"variant": "deg", "lam": 0.5})
    x, y = mnist_like_batch(8)
    out = net(x, y, ctx(8))
    ref = reference_pdd_free_loss(list(net.members), x, y, 0.5)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    params = list(net.parameters())
    g_out = torch.autograd.grad(out.loss, params, retain_graph=True)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g_out, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # what the DEG term alone contributes: every parameter of every member, conv1 included (double backprop)
    base = lenet_net({"variant": "baseline"})
    base.load_state_dict(net.state_dict())
    g_base = torch.autograd.grad(base(x, y, ctx(8)).loss, list(base.parameters()))
    names = [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, g_out, g_base, strict=True):
        assert (a - b).abs().max().item() > 1e-7, f"DEG gives no gradient to {name}"
    assert x.grad is None


def test_ce_terms_update_only_their_own_member_under_pdd() -> None:
    """PDD couples members only through masks computed on detached features (spec §5.2)."""
    net = lenet_net({"variant": "pdd"})
    x, y = mnist_like_batch(8)
    out = net(x, y, ctx(8, seed=3))
    for k in range(3):
        grads = torch.autograd.grad(out.terms[f"ce_{k}"], list(net.parameters()), retain_graph=True,
                                    allow_unused=True)
        for (name, _), g in zip(net.named_parameters(), grads, strict=True):
            own = name.startswith(f"members.{k}.")
            assert (g is not None and g.abs().sum() > 0) == own, name


def test_deg_decreases_when_trained() -> None:
    """Spec §14.2: gradient descent on λ·L_g lowers L_g (sign and wiring of the penalty)."""
    net = lenet_net({"variant": "deg", "lam": 1.0})
    x, y = mnist_like_batch(64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    values = []
    for _ in range(15):
        out = net(x, y, ctx(64))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        values.append(out.terms["deg"].item())
    assert values[-1] < values[0] - 0.3, values


def test_variant_losses() -> None:
    x, y = mnist_like_batch(8)
    base = lenet_net({"variant": "baseline"})
    out = base(x, y, ctx(8))
    ces = [F.cross_entropy(m(x), y) for m in base.members]
    assert out.loss.item() == pytest.approx(torch.stack(ces).mean().item(), abs=1e-6)
    assert set(out.terms) == {"ce_0", "ce_1", "ce_2", "ece"}
    summed = lenet_net({"variant": "baseline", "ce_reduction": "sum"})(x, y, ctx(8))
    assert summed.loss.item() == pytest.approx(torch.stack(ces).sum().item(), abs=1e-5)
    pdd_only = lenet_net({"variant": "pdd", "lam": 5.0})(x, y, ctx(8))
    assert "deg" not in pdd_only.terms and "keep_0" in pdd_only.terms
    assert pdd_only.loss.item() == pytest.approx(pdd_only.terms["ece"].item())  # λ unused without DEG
    zero_lam = lenet_net({"variant": "pdd_deg", "lam": 0.0})(x, y, ctx(8))
    assert zero_lam.loss.item() == pytest.approx(zero_lam.terms["ece"].item()) and "deg" in zero_lam.terms


# ------------------------------------------------------------------------------ diagnostics (spec §6.4)


def test_entropy_diversity_by_hand() -> None:
    c3 = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # l = 3, 2, 0, 1
    assert entropy_diversity(c3).item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    # l = 2, 5, 1
    c5 = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert entropy_diversity(c5).item() == pytest.approx((2 / 2 + 0 + 1 / 2) / 3)
    c2 = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)
    assert entropy_diversity(c2).item() == pytest.approx(0.5)


def test_feature_discrimination_by_hand() -> None:
    feats = torch.tensor([[[1.0, 3.0, 0.0, 0.0], [4.0, 6.0, 0.0, 0.0]],  # μ 2, 5; σ² 1, 1 → 9/2
                          [[1.0, 0.0, 0.0, 0.0], [4.0, 6.0, 0.0, 0.0]]])  # one active unit: undefined
    s = feature_discrimination(feats)
    assert s[0].item() == pytest.approx(4.5)
    assert math.isnan(s[1].item())


def test_results_identical_members_have_no_diversity() -> None:
    test = synthetic_dataset(300, seed=1)
    net = lenet_net({}, k=3)
    for m in net.members[1:]:
        m.load_state_dict(net.members[0].state_dict())
    r = net.method.results(net, test, torch.device("cpu"))
    assert r["entropy_diversity_E"] == 0.0 and r["n"] == 300
    assert r["n_ensemble_correct"] > 0 and r["n_feature_discrimination"] > 0  # untrained: ~10% right
    assert r["feature_discrimination_mean"] == pytest.approx(0.0, abs=1e-9)
    assert r["n_grad_angle"] == r["n_ensemble_correct"] and r["grad_angle_deg_mean"] < 0.5
    assert r["grad_zero_frac"] == 0.0


def test_diagnostics_leave_out_exactly_zero_gradients() -> None:
    """A saturated float32 softmax gives an input gradient of exactly 0: no angle, counted in grad_zero_frac."""
    two = synthetic_dataset(80, seed=3, num_classes=2)
    test = two.subset(torch.nonzero(two.labels == 0).flatten())  # member 3 is right and saturated on all
    members = linear_members([(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
    with torch.no_grad():  # member 3 saturates: logits [1e4·(x0 + x1), 0] with x in [0, 1]
        members[2].classifier.weight.copy_(torch.tensor([[1e4, 1e4], [0.0, 0.0]]))
        members[2].classifier.bias.copy_(torch.tensor([50.0, 0.0]))
    r = diversity_diagnostics(members, test, "cpu")
    assert r["grad_zero_frac"] == pytest.approx(1 / 3)  # every image, member 3 only
    x = test.images.float() / 255
    with torch.no_grad():
        ens_right = torch.stack([m(x).softmax(1) for m in members]).mean(0).argmax(1) == test.labels
    assert r["n_grad_angle"] == int(ens_right.sum()) > 0
    assert r["grad_angle_deg_mean"] == pytest.approx(90.0, abs=1e-3)  # only the pair (1, 2): d = (1,0) ⊥ (0,1)


def test_results_match_an_independent_count() -> None:
    test = synthetic_dataset(200, seed=2)
    net = lenet_net({}, k=3, seed=4)
    r = net.method.results(net, test, torch.device("cpu"))
    x, y = test.images.float() / 255, test.labels
    with torch.no_grad():
        right = [(m(x).argmax(1) == y).long() for m in net.members]
    votes = sum(right)
    expected = sum(min(v, 3 - v) for v in votes.tolist()) / len(votes)
    assert r["entropy_diversity_E"] == pytest.approx(expected, abs=1e-6)
    assert 0 <= r["entropy_diversity_E"] <= 1
    assert r["grad_angle_deg_mean"] is None or 0 <= r["grad_angle_deg_mean"] <= 180
    assert net.training  # results restore the mode


# ------------------------------------------------------------------ registry, validation, training


def test_registered_and_described() -> None:
    d = next(m for m in describe_methods() if m["name"] == "pdd")
    assert d["default_combine"] == "mean_probs" and d["min_members"] == 2
    hp = d["hyperparameters"]
    assert set(hp) == {"variant", "M", "alpha", "beta", "lam", "ce_reduction"}
    assert hp["alpha"]["default"] == 0.9 and hp["beta"]["default"] == 0.1 and hp["lam"]["default"] == 0.01
    assert hp["variant"]["default"] == "pdd_deg"
    assert all(v["description"] for v in hp.values())


def test_interval_defaults_follow_the_paper() -> None:
    assert method({}, 3).M == 10 and method({}, 5).M == 20
    assert method({}, 2).M == 5 and method({}, 4).M == 15 and method({}, 8).M == 35
    assert method({"M": 7}, 3).M == 7
    assert all(default_intervals(k) > k for k in range(2, 17))


@pytest.mark.parametrize("hp, members, where", [
    ({"M": 3}, 3, "hyperparameters.M"),
    ({"M": 1}, 3, "hyperparameters.M"),
    ({"alpha": 1.5}, 3, "hyperparameters.alpha"),
    ({"beta": -0.1}, 3, "hyperparameters.beta"),
    ({"lam": -1}, 3, "hyperparameters.lam"),
    ({"variant": "dropout"}, 3, "hyperparameters.variant"),
    ({"ce_reduction": "max"}, 3, "hyperparameters.ce_reduction"),
    ({"gamma": 1}, 3, "hyperparameters.gamma"),
    ({}, 1, "members"),
])
def test_invalid_hyperparameters_name_the_field(hp: dict, members: int, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "pdd", "members": members, "hyperparameters": hp})
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(where in loc for loc in locs) or any(where in err["msg"] for err in e.value.errors())


def test_resolved_spec_fills_defaults() -> None:
    spec = TrainSpec.model_validate({"method": "pdd", "members": 5, "hyperparameters": {}})
    assert spec.resolved()["hyperparameters"] == {"variant": "pdd_deg", "M": None, "alpha": 0.9, "beta": 0.1,
                                                  "lam": 0.01, "ce_reduction": "mean"}


def test_train_resume_and_load(tmp_path) -> None:  # noqa: ANN001
    """Two epochs interrupted after the first and resumed equal two uninterrupted epochs (masks are
    seeded per step); the final results carry E; the checkpoint loads as a mean-of-probabilities ensemble."""
    spec = {"method": "pdd", "dataset": "synthetic", "architecture": "lenet5", "members": 2, "epochs": 2,
            "batch_size": 64, "train_subset": 256, "eval_subset": 200, "seed": 3}
    full = train_ensemble(spec, device="cpu", hooks=TrainHooks(log=lambda s: None))
    saved: list[dict] = []

    def keep(metrics: dict, state: dict | None) -> None:
        saved.append(state)

    with pytest.raises(TrainingStopped):
        train_ensemble(spec, device="cpu", hooks=TrainHooks(on_epoch_end=keep, should_stop=lambda: True,
                                                            log=lambda s: None))
    resumed = train_ensemble(spec, device="cpu", resume_state=saved[-1], hooks=TrainHooks(log=lambda s: None))
    for a, b in zip(full.state["members"], resumed.state["members"], strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert resumed.history[0]["train_deg"] == full.history[0]["train_deg"]
    assert "train_keep_0" in full.history[0] and "train_deg" in full.history[1]
    res = full.results["method_results"]
    assert 0 <= res["entropy_diversity_E"] <= 1 and res["n"] == 200 and res["M"] == 5
    from ensemble_core.checkpoint import save_checkpoint

    path = save_checkpoint(full.state, tmp_path / "ensemble.pt")
    ens = load_ensemble(path)
    assert ens.combine == "mean_probs" and len(ens) == 2
    assert load_checkpoint(path)["progress"]["finished"]
    probs = ens(torch.rand(3, 1, 28, 28))
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
