"""CCE (spec specs/cce.md): the loss of §2.5 by hand, §9.1's unit tests, the per-member PGD of §2.6,
the transferability metrics and identities of §2.3/§2.9/§9.2, the entropy detector, hyperparameters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ensemble_core.attacks import crafting_mode, ensemble_log_probs, pgd_linf, stacked_member_pgd_linf
from ensemble_core.detection import ensemble_entropy, entropy_detection, entropy_from_log_probs, roc_auc
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.cce import (
    CCE,
    cce_loss_from_logits,
    default_training_attack,
    random_start_noise,
    subset_metrics,
    transfer_gap,
    transferability_report,
)
from ensemble_core.spec import TrainSpec

L3 = math.log(3.0)


def locs(err: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in err.errors()]


def make_method(members: int = 2, dataset: str = "synthetic", **hp: object) -> CCE:
    m = get_method("cce").from_spec_dict(dict(hp), members=members, num_classes=10, dataset=dataset,
                                         architecture="lenet5")
    assert isinstance(m, CCE)
    return m


class Tiny(nn.Module):
    """A small member: 1×4×4 images, a hidden layer, 3 classes."""

    def __init__(self, seed: int, bn: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def tiny_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def ctx_for(batch: int, *, rank: int = 0, world: int = 1, offset: int = 0, global_batch: int | None = None,
            seed: int = 7) -> StepContext:
    return StepContext(epoch=0, step=0, stage=0, rank=rank, world_size=world,
                       global_batch_size=global_batch or batch, offset=offset,
                       generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def tiny_net(method: CCE, n: int = 2, bn: bool = False) -> TrainNet:
    return TrainNet([Tiny(10 + k, bn) for k in range(n)], {}, method)


# ------------------------------------------------------------------------------------------------
# The loss of spec §2.5, on logits chosen so every quantity is a closed form
# ------------------------------------------------------------------------------------------------

# softmax([0, ln 3]) = (1/4, 3/4); softmax([ln 3, 0]) = (3/4, 1/4); softmax([0, 0]) = (1/2, 1/2)
A, B_, U = [0.0, L3], [L3, 0.0], [0.0, 0.0]
H34 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # entropy of (1/4, 3/4)


def test_eq5_two_members_by_hand() -> None:
    """N = 2, B = 1, C = 2, y = 1. clean: f¹ (1/4, 3/4), f² (1/2, 1/2); own adversarial: f¹ (3/4, 1/4),
    f² (1/2, 1/2); crossing: f¹ on x²_a (1/4, 3/4) → s = 3/4, f² on x¹_a (3/4, 1/4) → s = 1/4."""
    clean = torch.tensor([[A], [U]])
    cross = torch.tensor([[[B_], [A]], [[B_], [U]]])  # [n, i]: member n on x^i_a
    y = torch.tensor([1])
    loss, terms = cce_loss_from_logits(clean, cross, y, lam_pm=1.0, lam_dm=2.0, w_dpo=1.0)
    l1 = math.log(4 / 3) + math.log(4) + 1.0 * 0.75 * math.log(4 / 3) - 2.0 * 0.25 * H34
    l2 = math.log(2) + math.log(2) + 1.0 * 0.25 * math.log(4) - 2.0 * 0.75 * H34
    assert torch.allclose(loss, torch.tensor([l1, l2]), atol=1e-6)
    assert torch.allclose(terms["clean"], torch.tensor([math.log(4 / 3), math.log(2)]), atol=1e-6)
    assert torch.allclose(terms["dpo"], torch.tensor([math.log(4), math.log(2)]), atol=1e-6)
    assert torch.allclose(terms["cpo"], torch.tensor([0.75 * math.log(4 / 3), 0.25 * math.log(4)]), atol=1e-6)
    assert torch.allclose(terms["do"], torch.tensor([2 * 0.25 * H34, 2 * 0.75 * H34]), atol=1e-6)
    assert torch.allclose(terms["s"], torch.tensor([0.75, 0.25]))


def test_w_dpo_and_hard_indicator_by_hand() -> None:
    clean = torch.tensor([[A], [U]])
    cross = torch.tensor([[[B_], [A]], [[B_], [U]]])
    y = torch.tensor([1])
    loss, terms = cce_loss_from_logits(clean, cross, y, lam_pm=1.0, lam_dm=2.0, w_dpo=0.5, indicator="hard")
    # hard: f¹ on x²_a predicts 1 = y → s = 1 (promote only); f² on x¹_a predicts 0 → s = 0 (demote only)
    l1 = math.log(4 / 3) + 0.5 * math.log(4) + math.log(4 / 3)
    l2 = math.log(2) + 0.5 * math.log(2) - 2.0 * H34
    assert torch.allclose(loss, torch.tensor([l1, l2]), atol=1e-6)
    assert torch.allclose(terms["s"], torch.tensor([1.0, 0.0]))


def eq5_reference(clean: torch.Tensor, cross: torch.Tensor, y: torch.Tensor, lam_pm: float, lam_dm: float,
                  w_dpo: float = 1.0) -> torch.Tensor:
    """Eq. 5 written out sample by sample, member by member (spec §2.5), in float64."""
    n_members, b = clean.shape[0], clean.shape[1]
    out = []
    for n in range(n_members):
        total = 0.0
        for j in range(b):
            p = torch.softmax(clean[n, j].double(), 0)
            total += -math.log(p[y[j]])
            p = torch.softmax(cross[n, n, j].double(), 0)
            total += w_dpo * -math.log(p[y[j]])
            acc = 0.0
            for i in range(n_members):
                if i == n:
                    continue
                p = torch.softmax(cross[n, i, j].double(), 0)
                s = float(p[y[j]])
                h = float(-(p * p.log()).sum())
                acc += lam_pm * s * -math.log(s) - lam_dm * (1 - s) * h
            total += acc / (n_members - 1)
        out.append(total / b)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n_members", [2, 3, 4])
def test_eq5_matches_sample_by_sample_reference(n_members: int) -> None:
    g = torch.Generator().manual_seed(n_members)
    clean = 3 * torch.randn(n_members, 5, 4, generator=g)
    cross = 3 * torch.randn(n_members, n_members, 5, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    loss, _ = cce_loss_from_logits(clean, cross, y, lam_pm=1.5, lam_dm=0.7, w_dpo=0.9)
    assert torch.allclose(loss.double(), eq5_reference(clean, cross, y, 1.5, 0.7, 0.9), atol=1e-5)


def test_two_members_eq5_equals_eq3_eq4() -> None:
    """§9.1: for N = 2 Eq. 5 is Eq. 3–4 (no 1/(N−1) left, each member's single crossing term)."""
    g = torch.Generator().manual_seed(1)
    clean, cross = torch.randn(2, 6, 5, generator=g), torch.randn(2, 2, 6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    loss, _ = cce_loss_from_logits(clean, cross, y, lam_pm=2.0, lam_dm=3.0)

    def eq3(n: int, other: int) -> torch.Tensor:
        lp = F.log_softmax(cross[n, other], -1)
        s = lp.gather(1, y[:, None]).squeeze(1).exp()
        h = -(lp.exp() * lp).sum(1)
        return (F.cross_entropy(clean[n], y) + F.cross_entropy(cross[n, n], y)
                + (2.0 * s * -lp.gather(1, y[:, None]).squeeze(1)).mean() - (3.0 * (1 - s) * h).mean())

    assert torch.allclose(loss, torch.stack([eq3(0, 1), eq3(1, 0)]), atol=1e-6)


def test_zero_lambdas_give_clean_plus_own_adversarial_ce() -> None:
    """§9.1: λ_pm = λ_dm = 0 → Σ_n [CE(clean) + CE(own adversarial)]."""
    g = torch.Generator().manual_seed(2)
    clean, cross = torch.randn(3, 6, 5, generator=g), torch.randn(3, 3, 6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    loss, _ = cce_loss_from_logits(clean, cross, y, lam_pm=0.0, lam_dm=0.0)
    expected = torch.stack([F.cross_entropy(clean[n], y) + F.cross_entropy(cross[n, n], y) for n in range(3)])
    assert torch.allclose(loss, expected, atol=1e-6)
    # and the crossing examples have no effect at all
    cross2 = cross.clone()
    cross2[0, 1] += 10
    assert torch.allclose(cce_loss_from_logits(clean, cross2, y, 0.0, 0.0)[0], loss)


def test_no_gradient_through_the_soft_indicator() -> None:
    """§9.1: s is a stop-gradient. The cPO/DO gradients w.r.t. member n's logits on x^i_a are the
    analytic ones with s held constant: λ_pm·s·(p − e_y) and −λ_dm·(1 − s)·∇H, ∇_k H = −p_k (log p_k + H)."""
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 4, 5, generator=g)
    cross = torch.randn(2, 2, 4, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (4,), generator=g)
    lam_pm, lam_dm = 1.3, 0.6
    loss, _ = cce_loss_from_logits(clean, cross, y, lam_pm, lam_dm)
    (grad,) = torch.autograd.grad(loss.sum(), cross)
    z = cross.detach()[0, 1]  # member 0 on member 1's example
    p = z.softmax(-1)
    s = p.gather(1, y[:, None])
    h = -(p * p.log()).sum(1, keepdim=True)
    onehot = F.one_hot(y, 5).float()
    expected = (lam_pm * s * (p - onehot) - lam_dm * (1 - s) * (-p * (p.log() + h))) / 4  # batch mean of 4
    assert torch.allclose(grad[0, 1], expected, atol=1e-6)
    # with s differentiable the gradient would be different (the test can fail)
    lp = F.log_softmax(cross[0, 1], -1)
    s_live = lp.gather(1, y[:, None]).squeeze(1).exp()
    live = (lam_pm * s_live * -lp.gather(1, y[:, None]).squeeze(1)
            - lam_dm * (1 - s_live) * -(lp.exp() * lp).sum(1)).mean()
    (grad_live,) = torch.autograd.grad(live, cross)
    assert not torch.allclose(grad_live[0, 1], expected, atol=1e-4)


def test_demotion_term_is_bounded_by_log_c() -> None:
    """§9.1: −λ_dm(1−s)H ≥ −λ_dm·log C, so the loss is bounded below whatever λ_dm."""
    g = torch.Generator().manual_seed(4)
    lam_dm = 5.0
    for scale in (0.01, 1.0, 30.0):
        clean = scale * torch.randn(3, 64, 10, generator=g)
        cross = scale * torch.randn(3, 3, 64, 10, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        loss, terms = cce_loss_from_logits(clean, cross, y, lam_pm=0.0, lam_dm=lam_dm)
        assert (terms["do"] <= lam_dm * math.log(10) + 1e-5).all()
        assert (loss >= -lam_dm * math.log(10) - 1e-5).all()
    # near the bound: uniform outputs give H = log C and s = 1/C, so (1 − s)·H = (1 − 1/C)·log C
    flat_clean, flat_cross = torch.zeros(2, 1, 10), torch.zeros(2, 2, 1, 10)
    loss, terms = cce_loss_from_logits(flat_clean, flat_cross, torch.tensor([3]), 0.0, lam_dm)
    assert torch.allclose(terms["do"], torch.full((2,), lam_dm * 0.9 * math.log(10)), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The method's loss end to end: PGD per member, gradients per member
# ------------------------------------------------------------------------------------------------


def recraft(method: CCE, net: TrainNet, x: torch.Tensor, y: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """The x^i_a the method's loss crafts, reproduced independently with the same random start."""
    ctx = ctx_for(x.shape[0], seed=seed)
    eps, alpha = method.attack.draw(ctx.generator)
    noise = random_start_noise(ctx, x.shape[0], len(net.members), tuple(x.shape[1:]))
    members = list(net.members)
    outs = []
    for k, m in enumerate(members):
        m.eval()
        outs.append(pgd_linf(lambda z, m=m: F.cross_entropy(m(z), y, reduction="sum"), x, eps, alpha,
                             method.attack.steps, noise[k]))
        m.train()
    return torch.stack(outs)


def test_method_loss_equals_eq5_on_the_members_own_pgd_examples() -> None:
    method = make_method(3, lam_pm=0.8, lam_dm=1.7, steps=3)
    net = tiny_net(method, 3)
    x, y = tiny_batch(8)
    out = method.loss(net, x, y, ctx_for(8))
    x_adv = recraft(method, net, x, y)
    clean = torch.stack([m(x) for m in net.members])
    cross = torch.stack([torch.stack([m(x_adv[i]) for i in range(3)]) for m in net.members])
    per_member, _ = cce_loss_from_logits(clean, cross, y, 0.8, 1.7)
    assert torch.allclose(out.loss, per_member.sum(), atol=1e-5)
    # the examples really are adversarial for their own member, inside the ball and the image box
    eps = method.attack.eps
    assert eps == pytest.approx(0.1) and method.attack.step_ratio == 0.25
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    for i, m in enumerate(net.members):
        assert F.cross_entropy(m(x_adv[i]), y) > F.cross_entropy(m(x), y)
    assert set(out.terms) >= {"ce_clean", "dpo", "cpo", "do", "s_mean", "acc_own_adv", "acc_cross_adv"}


def test_zero_lambdas_method_loss_is_sum_of_clean_and_own_adversarial_ce() -> None:
    method = make_method(2, mode="base", steps=2)
    assert (method.hp.lam_pm, method.hp.lam_dm) == (0.0, 0.0)
    net = tiny_net(method, 2)
    x, y = tiny_batch(8)
    out = method.loss(net, x, y, ctx_for(8))
    x_adv = recraft(method, net, x, y)
    expected = sum(F.cross_entropy(m(x), y) + F.cross_entropy(m(x_adv[n]), y)
                   for n, m in enumerate(net.members))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_each_member_loss_reaches_only_its_own_parameters() -> None:
    """§9.1: no gradient from L_n to θ_j, j ≠ n; the adversarial inputs are constants of the loss.
    Term by term: clean, dPO, cPO and DO of L_n each move θ_n only."""
    method = make_method(3, steps=2)
    net = tiny_net(method, 3)
    x, y = tiny_batch(8)
    x_adv = recraft(method, net, x, y)
    members = list(net.members)
    clean = torch.stack([m(x) for m in members])
    cross = torch.stack([torch.stack([m(x_adv[i]) for i in range(3)]) for m in members])
    per_member, _ = cce_loss_from_logits(clean, cross, y, 1.0, 1.0)
    for n in range(3):
        grads = torch.autograd.grad(per_member[n], [p for m in members for p in m.parameters()],
                                    retain_graph=True, allow_unused=True)
        sizes = [len(list(m.parameters())) for m in members]
        start = 0
        for j, size in enumerate(sizes):
            g_j = grads[start : start + size]
            start += size
            moved = any(g is not None and g.abs().sum() > 0 for g in g_j)
            assert moved == (j == n), f"L_{n} {'missed' if j == n else 'reached'} θ_{j}"
    # term by term, for member 0
    lp = F.log_softmax(cross[0, 1], -1)
    s = lp.gather(1, y[:, None]).squeeze(1).detach().exp()
    term_values = {
        "clean": F.cross_entropy(clean[0], y), "dpo": F.cross_entropy(cross[0, 0], y),
        "cpo": (s * -lp.gather(1, y[:, None]).squeeze(1)).mean(),
        "do": -((1 - s) * -(lp.exp() * lp).sum(1)).mean(),
    }
    for name, t in term_values.items():
        g = torch.autograd.grad(t, [p for m in members for p in m.parameters()], retain_graph=True,
                                allow_unused=True)
        n0 = len(list(members[0].parameters()))
        assert any(v is not None and v.abs().sum() > 0 for v in g[:n0]), f"{name} gives θ_0 no gradient"
        assert all(v is None or v.abs().sum() == 0 for v in g[n0:]), f"{name} reaches another member"


def test_total_gradient_per_member_equals_its_own_loss_gradient() -> None:
    method = make_method(2, lam_pm=1.0, lam_dm=2.0, steps=2)
    net = tiny_net(method, 2)
    x, y = tiny_batch(8)
    out = method.loss(net, x, y, ctx_for(8))
    out.loss.backward()
    x_adv = recraft(method, net, x, y)
    for n, m in enumerate(net.members):
        own = F.cross_entropy(m(x), y) + F.cross_entropy(m(x_adv[n]), y)
        lp = F.log_softmax(m(x_adv[1 - n]), -1)
        s = lp.gather(1, y[:, None]).squeeze(1).detach().exp()
        cpo = (s * -lp.gather(1, y[:, None]).squeeze(1)).mean()
        do = (2 * (1 - s) * -(lp.exp() * lp).sum(1)).mean()
        own = own + cpo - do
        expected = torch.autograd.grad(own, list(m.parameters()))
        for p, e in zip(m.parameters(), expected, strict=True):
            assert torch.allclose(p.grad, e, atol=1e-5)


def test_sharded_batch_gives_the_same_gradient_as_the_whole_batch() -> None:
    """Two ranks with halves (random starts sliced from the global draw) ≡ one process with the batch;
    also with a sampled ε (one scalar per batch from the step generator)."""
    for hp in ({"steps": 3}, {"steps": 3, "eps_range": (0.05, 0.2)}):
        method = make_method(2, **hp)
        x, y = tiny_batch(8)
        full = tiny_net(method, 2)
        full_out = method.loss(full, x, y, ctx_for(8))
        full_out.loss.backward()
        grads = [torch.zeros_like(p) for p in full.parameters()]
        for rank in range(2):
            net = tiny_net(method, 2)
            sl = slice(4 * rank, 4 * rank + 4)
            ctx = ctx_for(4, rank=rank, world=2, offset=4 * rank, global_batch=8)
            out = method.loss(net, x[sl], y[sl], ctx)
            out.loss.backward()
            for acc, p in zip(grads, net.parameters(), strict=True):
                acc += p.grad / 2  # DDP averages the ranks' gradients
        for g, p in zip(grads, full.parameters(), strict=True):
            assert torch.allclose(g, p.grad, atol=1e-5)


def test_pgd_random_start_differs_per_member_and_per_step() -> None:
    ctx = ctx_for(4)
    noise = random_start_noise(ctx, 4, 3, (1, 4, 4))
    assert noise.shape == (3, 4, 1, 4, 4) and noise.min() >= -1 and noise.max() <= 1
    assert not torch.allclose(noise[0], noise[1])
    assert not torch.allclose(noise, random_start_noise(ctx, 4, 3, (1, 4, 4)))


# ------------------------------------------------------------------------------------------------
# PGD helpers (ensemble_core.attacks)
# ------------------------------------------------------------------------------------------------


def test_stacked_member_pgd_equals_one_pgd_per_member() -> None:
    members = [Tiny(k) for k in range(3)]
    x, y = tiny_batch(6)
    noise = 2 * torch.rand(3, 6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) - 1
    stacked = stacked_member_pgd_linf(members, x, y, 0.2, 0.05, 5, noise)
    for k, m in enumerate(members):
        single = pgd_linf(lambda z, m=m: F.cross_entropy(m(z), y, reduction="sum"), x, 0.2, 0.05, 5, noise[k])
        assert torch.allclose(stacked[k], single, atol=1e-6)
    # per-member labels
    y2 = torch.stack([y, (y + 1) % 3, y])
    stacked2 = stacked_member_pgd_linf(members, x, y2, 0.2, 0.05, 5, noise)
    single = pgd_linf(lambda z: F.cross_entropy(members[1](z), y2[1], reduction="sum"), x, 0.2, 0.05, 5,
                      noise[1])
    assert torch.allclose(stacked2[1], single, atol=1e-6)
    with pytest.raises(ValueError):
        stacked_member_pgd_linf(members, x, y[:3], 0.2, 0.05, 1)


def test_crafting_mode_eval_uses_running_stats_and_restores_train_mode() -> None:
    m = Tiny(0, bn=True)
    m.train()
    m(torch.rand(16, 1, 4, 4))  # some running statistics
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = tiny_batch(6)
    with crafting_mode([m], "eval"):
        assert not m.training and not m.bn.training
        adv = stacked_member_pgd_linf([m], x, y, 0.1, 0.03, 3)
    assert m.training and m.bn.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.eval()
    ref = pgd_linf(lambda z: F.cross_entropy(m(z), y, reduction="sum"), x, 0.1, 0.03, 3)
    assert torch.allclose(adv[0], ref)


def test_crafting_mode_train_uses_batch_stats_but_keeps_running_stats() -> None:
    m = Tiny(0, bn=True)
    m.eval()  # e.g. a frozen member: must come back in eval mode
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = tiny_batch(6)
    with crafting_mode([m], "train"):
        assert m.bn.training
        stacked_member_pgd_linf([m], x, y, 0.1, 0.03, 3)
    assert not m.training and not m.bn.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError), crafting_mode([m], "batch"):  # type: ignore[arg-type]
        pass


def test_batchnorm_members_get_separate_forward_calls() -> None:
    """§8 A14: with BatchNorm each input batch is its own forward call (its own batch statistics)."""
    from ensemble_core.methods.cce import member_forwards

    m = Tiny(0, bn=True)
    m.train()
    a, b = torch.rand(4, 1, 4, 4), torch.rand(4, 1, 4, 4) + 0.5
    out = member_forwards([m], [a, b])[0]
    assert torch.allclose(out[1], m(b), atol=1e-6)
    assert not torch.allclose(out[1], m(torch.cat([a, b]))[4:], atol=1e-3)
    plain = Tiny(1)
    out = member_forwards([plain], [a, b])[0]
    assert torch.allclose(out[1], plain(b), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Transferability metrics (spec §2.3, §2.9, §9.2)
# ------------------------------------------------------------------------------------------------


def test_subset_cells_by_hand_and_identities() -> None:
    # 8 points, N = 2; columns: member-1 right, member-2 right, ensemble right
    pts = [(1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 0, 1), (1, 0, 0), (0, 1, 1), (0, 0, 0), (0, 0, 0)]
    mc = torch.tensor([[p[0] for p in pts], [p[1] for p in pts]], dtype=torch.bool)
    ec = torch.tensor([p[2] for p in pts], dtype=torch.bool)
    r = subset_metrics(mc, ec)
    assert r["cells"] == {"S11": 37.5, "S10": 25.0, "S01": 12.5, "S00": 25.0}
    assert r["a_en"] == 62.5 and r["nT"] == 12.5 and r["a_single"] == 25.0 and r["a_en_all_wrong"] == 0.0
    assert sum(r["cells"].values()) == pytest.approx(100.0)
    # Table 6 identities (§9.2), exact here because no point has the ensemble right with both members wrong
    assert r["nT"] == pytest.approx(100 - r["a_en"] - r["cells"]["S00"])
    assert r["a_single"] == pytest.approx(r["a_en"] - r["cells"]["S11"])
    assert r["member_acc_on_en"] == [62.5, 50.0]


def test_identities_when_the_average_is_right_but_every_member_is_wrong() -> None:
    """Averaged probabilities can be right where all members are wrong; the paper's nT identity is then
    off by exactly that share, which the metric reports; a_single = a_en − |S11| still holds (Lemma 1)."""
    # member probabilities over 3 classes, y = 0: each member prefers a different wrong class
    p1 = torch.tensor([[0.45, 0.55, 0.0]])
    p2 = torch.tensor([[0.45, 0.0, 0.55]])
    logits = torch.stack([p1.clamp_min(1e-9).log(), p2.clamp_min(1e-9).log()])
    y = torch.tensor([0])
    ens_right = ensemble_log_probs([lambda z: logits[0], lambda z: logits[1]], torch.zeros(1)).argmax(-1) == y
    member_right = logits.argmax(-1) == y
    assert ens_right.item() and not member_right.any()
    r = subset_metrics(member_right, ens_right)
    assert r["a_en_all_wrong"] == 100.0 and r["cells"]["S00"] == 100.0
    assert r["nT"] == pytest.approx(100 - r["a_en"] - r["cells"]["S00"] + r["a_en_all_wrong"])
    assert r["a_single"] == pytest.approx(r["a_en"] - r["cells"]["S11"])


@pytest.mark.parametrize("n_members", [2, 3, 4])
def test_identities_hold_on_random_predictions(n_members: int) -> None:
    g = torch.Generator().manual_seed(n_members)
    logits = 2 * torch.randn(n_members, 500, 4, generator=g)
    y = torch.randint(0, 4, (500,), generator=g)
    mc = logits.argmax(-1) == y
    ec = (torch.logsumexp(logits.log_softmax(-1), 0)).argmax(-1) == y
    r = subset_metrics(mc, ec)
    assert len(r["cells"]) == 2**n_members
    assert sum(r["cells"].values()) == pytest.approx(100.0)
    top, bottom = "S" + "1" * n_members, "S" + "0" * n_members
    assert r["a_single"] == pytest.approx(r["a_en"] - r["cells"][top])
    assert r["nT"] == pytest.approx(100 - r["a_en"] - r["cells"][bottom] + r["a_en_all_wrong"])
    assert r["all_right"] == pytest.approx(r["cells"][top])


# Spec §7.4, Table 6: a(en,en), |S11|, |S01|, |S10|, |S00|, nT, a_single
TABLE6 = {
    "ADV-EN": (40.7, 24.0, 17.0, 13.0, 46.0, 13.3, 16.7),
    "ADP": (42.9, 25.7, 13.1, 11.7, 49.5, 7.6, 17.2),
    "CCE-RM": (45.5, 39.9, 5.2, 5.5, 49.5, 5.0, 5.6),
    "CCE-Base": (43.3, 36.1, 6.5, 7.2, 50.3, 6.4, 7.2),
}


@pytest.mark.parametrize("row", sorted(TABLE6))
def test_paper_table6_rows_satisfy_the_identities(row: str) -> None:
    a_en, s11, s01, s10, s00, n_t, a_single = TABLE6[row]
    assert s11 + s01 + s10 + s00 == pytest.approx(100.0, abs=0.2)
    assert n_t == pytest.approx(100 - a_en - s00, abs=1e-9)
    assert a_single == pytest.approx(a_en - s11, abs=1e-9)


def test_transfer_gap_by_hand() -> None:
    a = [[30.0, 70.0], [60.0, 40.0]]  # a[i][j]: member j on member i's examples
    assert transfer_gap(a) == {"T": (70 - 30) + (60 - 40), "T_per_pair": 30.0}
    a3 = [[10.0, 50.0, 40.0], [20.0, 15.0, 35.0], [30.0, 30.0, 5.0]]
    gaps = [40, 30, 5, 20, 25, 25]
    assert transfer_gap(a3)["T"] == pytest.approx(sum(gaps))
    assert transfer_gap(a3)["T_per_pair"] == pytest.approx(sum(gaps) / 6)


def test_transferability_report_is_consistent() -> None:
    members = [Tiny(k) for k in range(2)]
    x, y = tiny_batch(40, seed=5)
    r = transferability_report(members, x, y, eps=0.3, alpha=0.1, steps=5, batch_size=16)
    assert r["attack"]["n"] == 40 and r["points"] == 40
    # the numbers are percentages of 40 images
    for i in range(2):
        for j in range(2):
            assert (r["a_member"][i][j] * 40 / 100) == pytest.approx(round(r["a_member"][i][j] * 40 / 100))
    assert sum(r["cells"].values()) == pytest.approx(100.0)
    assert r["a_single"] == pytest.approx(r["a_en"] - r["cells"]["S11"])
    assert r["nT"] == pytest.approx(100 - r["a_en"] - r["cells"]["S00"] + r["a_en_all_wrong"])
    # a(en,en) is the ensemble's accuracy on its own PGD: recompute it independently
    gen = torch.Generator().manual_seed(0)
    right = 0
    for s in range(0, 40, 16):
        xb, yb = x[s : s + 16], y[s : s + 16]
        torch.rand((2, *xb.shape), generator=gen)  # the member attacks' starts come first
        noise = 2 * torch.rand(xb.shape, generator=gen) - 1
        xe = pgd_linf(lambda z, yb=yb: F.nll_loss(ensemble_log_probs(members, z), yb, reduction="sum"),
                      xb, 0.3, 0.1, 5, noise)
        right += int((ensemble_log_probs(members, xe).argmax(-1) == yb).sum())
    assert r["a_en"] == pytest.approx(100 * right / 40)
    assert 0.0 <= r["detection"]["auc"] <= 1.0


# ------------------------------------------------------------------------------------------------
# Detection (spec §3): entropy of the averaged prediction, ROC AUC
# ------------------------------------------------------------------------------------------------


def test_entropy_by_hand() -> None:
    lp = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]).log()
    assert torch.allclose(entropy_from_log_probs(lp), torch.tensor([H34, math.log(2), 0.0]), atol=1e-6)
    # ensemble entropy is the entropy of the mean probability, not the mean of member entropies
    z = torch.tensor([[[0.0, L3]], [[L3, 0.0]]])  # members (1/4, 3/4) and (3/4, 1/4) → mean (1/2, 1/2)
    assert torch.allclose(ensemble_entropy(z), torch.tensor([math.log(2)]), atol=1e-6)


def test_roc_auc_by_hand() -> None:
    neg = torch.tensor([0.1, 0.2, 0.3])
    pos = torch.tensor([0.25, 0.4])
    assert roc_auc(neg, pos) == pytest.approx(5 / 6)  # 0.25 beats 2 of 3, 0.4 beats 3 of 3
    assert roc_auc(neg, neg + 1) == 1.0 and roc_auc(neg + 1, neg) == 0.0
    assert roc_auc(torch.tensor([0.2, 0.2]), torch.tensor([0.2])) == 0.5  # ties count one half
    assert roc_auc(torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.5])) == pytest.approx((1.5 + 2) / 4)
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([]), pos)


def test_entropy_detection_variants() -> None:
    # "members" that look at a pixel: confident when it is 0 (clean), flat when it is 1 (attacked)
    def member(z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1)[:, :1]
        return torch.cat([5 * (1 - flat), torch.zeros_like(flat), torch.zeros_like(flat)], 1)

    x_clean = torch.zeros(4, 1, 2, 2)
    x_adv = x_clean.clone()
    x_adv[:, 0, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last copy is unchanged
    y = torch.tensor([0, 0, 0, 1])
    r = entropy_detection([member, member], x_clean, y, x_adv)
    # clean entropies all equal e; adversarial: three flat (log 3) and one equal to e → AUC = (3 + 0.5)/4
    assert r["auc"] == pytest.approx(3.5 / 4)
    # flat outputs predict class 0 (lowest index), right for y = 0: only the unchanged last copy is wrong
    assert r["n_clean_correct"] == 3 and r["n_adversarial_successful"] == 1
    assert r["auc_successful"] == pytest.approx(0.5)  # both sets have entropy e: a tie
    assert r["max_entropy"] == pytest.approx(math.log(3))
    assert r["mean_entropy_adversarial"] > r["mean_entropy_clean"]


# ------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------


def test_modes_resolve_the_lambdas() -> None:
    assert (make_method().hp.lam_pm, make_method().hp.lam_dm) == (1.0, 1.0)
    dm = make_method(mode="detection")
    assert (dm.hp.lam_pm, dm.hp.lam_dm, dm.hp.w_dpo) == (0.0, 5.0, 1.0)
    assert (make_method(mode="base").hp.lam_pm, make_method(mode="base").hp.lam_dm) == (0.0, 0.0)
    ablation = make_method(mode="base", lam_dm=2.0)  # Table 11a's "DO only"
    assert (ablation.hp.lam_pm, ablation.hp.lam_dm) == (0.0, 2.0)
    spec = TrainSpec.model_validate({"method": "cce", "hyperparameters": {"mode": "detection"}})
    assert spec.hyperparameters["lam_pm"] == 0.0 and spec.hyperparameters["lam_dm"] == 5.0  # resolved, stored


@pytest.mark.parametrize("hp, field", [
    ({"lam_pm": -1}, "lam_pm"), ({"lam_dm": 101}, "lam_dm"), ({"w_dpo": -0.5}, "w_dpo"),
    ({"eps": 0}, "eps"), ({"eps": 1.5}, "eps"), ({"steps": 0}, "steps"), ({"step_size": -1}, "step_size"),
    ({"mode": "robust"}, "mode"), ({"indicator": "soft-ish"}, "indicator"), ({"attack_label": "pred_y"},
                                                                             "attack_label"),
    ({"attack_bn_mode": "batch"}, "attack_bn_mode"), ({"eps_range": (0.05, 0.01)}, "eps_range"),
    ({"eps": 0.1, "eps_range": (0.01, 0.05)}, "eps_range"), ({"metric_steps": -1}, "metric_steps"),
    ({"lamda": 1}, "lamda"),
])
def test_bad_hyperparameters_name_the_field(hp: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "cce", "hyperparameters": hp})
    assert any(loc.endswith(field) for loc in locs(e.value)), locs(e.value)


def test_describe_lists_every_hyperparameter_with_its_meaning() -> None:
    d = next(m for m in describe_methods() if m["name"] == "cce")
    for name in ("mode", "lam_pm", "lam_dm", "w_dpo", "indicator", "eps", "eps_range", "step_size", "steps",
                 "random_start", "attack_label", "attack_bn_mode", "metric_steps"):
        assert d["hyperparameters"][name]["description"], name
    assert "λ_pm" in d["hyperparameters"]["lam_pm"]["description"]
    assert d["hyperparameters"]["lam_pm"]["anyOf"][0]["maximum"] == 100
    assert d["default_combine"] == "mean_probs"


@pytest.mark.parametrize("dataset, arch, eps, rng, eta", [
    ("cifar10", "dkd_cifar10", 8 / 255, None, 2 / 255),
    ("cifar100", "dkd_cifar10", 0.01, None, 0.001),
    ("mnist", "lenet5", 0.3, None, 0.075),
    ("fashion_mnist", "lenet5", 0.1, None, 0.025),
])
def test_training_attack_per_dataset(dataset: str, arch: str, eps: float, rng: object, eta: float) -> None:
    m = get_method("cce").from_spec_dict({}, members=2, num_classes=10, dataset=dataset, architecture=arch)
    assert m.attack.eps == pytest.approx(eps) and m.attack.eps_range == rng
    e, a = m.attack.draw(torch.Generator())
    assert (e, a) == pytest.approx((eps, eta))
    assert m.attack.steps == 10 and m.attack.as_dict()["step_size"] == pytest.approx(eta)


def test_resnet_cifar10_samples_eps_per_batch() -> None:
    assert default_training_attack("cifar10", "resnet20")[1] == (0.01, 0.05)
    m = get_method("cce").from_spec_dict({}, members=2, num_classes=10, dataset="cifar10",
                                         architecture="resnet20")
    g = torch.Generator().manual_seed(0)
    draws = [m.attack.draw(g) for _ in range(50)]
    assert all(0.01 <= e <= 0.05 and a == pytest.approx(e / 10) for e, a in draws)
    assert len({e for e, _ in draws}) == 50
    fixed_step = get_method("cce").from_spec_dict({"step_size": 0.004}, members=2, num_classes=10,
                                                  dataset="cifar10", architecture="resnet20")
    assert fixed_step.attack.draw(g)[1] == 0.004
    override = get_method("cce").from_spec_dict({"eps": 0.2, "step_size": 0.01}, members=2, num_classes=10,
                                                dataset="mnist", architecture="lenet5")
    assert override.attack.draw(g) == (0.2, 0.01) and override.attack.source == "hyperparameters.eps"


def test_single_member_is_madry_training() -> None:
    method = make_method(1, steps=2)
    net = tiny_net(method, 1)
    x, y = tiny_batch(8)
    out = method.loss(net, x, y, ctx_for(8))
    x_adv = recraft(method, net, x, y)
    m = net.members[0]
    assert torch.allclose(out.loss, F.cross_entropy(m(x), y) + F.cross_entropy(m(x_adv[0]), y), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Real MNIST: a small run end to end, interrupted and resumed, the saved ensemble loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_cce_on_real_mnist_resumes_and_loads(tmp_path: Path) -> None:
    from ensemble_core.checkpoint import load_checkpoint, load_ensemble, save_checkpoint
    from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble, train_local

    spec = {"method": "cce", "dataset": "mnist", "architecture": "lenet5", "members": 2, "epochs": 2,
            "batch_size": 64, "train_subset": 640, "eval_subset": 200, "seed": 0,
            "hyperparameters": {"steps": 3, "metric_steps": 5, "metric_examples": 100}}
    saved: list[int] = []

    def keep(metrics: dict, state: dict | None) -> None:  # written at once, as the worker and train_local do
        assert state is not None
        save_checkpoint(state, tmp_path / "checkpoint.pt")
        saved.append(metrics["epoch"])

    hooks = TrainHooks(on_epoch_end=keep, should_stop=lambda: bool(saved), log=lambda s: None)
    with pytest.raises(TrainingStopped):  # interrupted during epoch 2
        train_ensemble(spec, hooks=hooks)
    assert saved == [1]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["progress"]["epoch"] == 1
    result, path = train_local(spec, tmp_path, progress=False, log=lambda s: None)  # resumes from it
    assert [h["epoch"] for h in result.history] == [1, 2]
    full, _ = train_local(spec, tmp_path / "uninterrupted", progress=False, log=lambda s: None)
    for a, b in zip(full.state["members"], result.state["members"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    ens = load_ensemble(path)
    assert ens.combine == "mean_probs" and len(ens) == 2
    assert result.metrics["test_clean_acc"] > 0.5  # 20 steps of adversarial training on 640 images
    h = result.history[-1]
    assert {"train_ce_clean", "train_dpo", "train_cpo", "train_do", "train_acc_own_adv"} <= set(h)
    res = result.results["method_results"]
    assert res["training_attack"]["eps"] == 0.3 and res["training_attack"]["steps"] == 3
    tr = res["transferability"]
    assert tr["attack"]["n"] == 100 and tr["attack"]["eps"] == 0.3 and tr["attack"]["steps"] == 5
    assert sum(tr["cells"].values()) == pytest.approx(100.0)
    assert tr["a_single"] == pytest.approx(tr["a_en"] - tr["cells"]["S11"])
    assert tr["nT"] == pytest.approx(100 - tr["a_en"] - tr["cells"]["S00"] + tr["a_en_all_wrong"])
    assert 0.0 <= tr["detection"]["auc"] <= 1.0
