"""ADV-EN (spec specs/cce.md §2.6–§2.8, correction 1, A16): whole-ensemble PGD adversarial training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ensemble_core.attacks import ensemble_log_probs, pgd_linf
from ensemble_core.methods import describe_methods, get_method
from ensemble_core.methods.adv_en import ADVEN, adv_en_loss_from_logits
from ensemble_core.methods.base import StepContext, TrainNet
from ensemble_core.methods.cce import random_start_noise
from ensemble_core.spec import TrainSpec

L3 = math.log(3.0)
A, B_, U = [0.0, L3], [L3, 0.0], [0.0, 0.0]  # softmax: (1/4, 3/4), (3/4, 1/4), (1/2, 1/2)


class Tiny(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make(members: int = 2, **hp: object) -> ADVEN:
    m = get_method("adv_en").from_spec_dict(dict(hp), members=members, num_classes=3, dataset="synthetic",
                                            architecture="lenet5")
    assert isinstance(m, ADVEN)
    return m


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def ctx_for(b: int, *, rank: int = 0, world: int = 1, offset: int = 0, global_batch: int | None = None
            ) -> StepContext:
    return StepContext(0, 0, 0, rank, world, global_batch or b, offset, torch.Generator().manual_seed(7),
                       torch.device("cpu"))


def test_member_sum_loss_by_hand() -> None:
    clean = torch.tensor([[A], [B_]])  # member 1 (1/4, 3/4), member 2 (3/4, 1/4); y = 1
    adv = torch.tensor([[U], [A]])
    loss, terms = adv_en_loss_from_logits(clean, adv, torch.tensor([1]), "member_sum")
    expected = math.log(4 / 3) + math.log(4) + math.log(2) + math.log(4 / 3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert terms["clean"].item() == pytest.approx(math.log(4 / 3) + math.log(4), abs=1e-6)


def test_unified_loss_by_hand() -> None:
    """−log f^en_y: clean mean probability of y = (3/4 + 1/4)/2 = 1/2; adversarial (1/2 + 3/4)/2 = 5/8."""
    clean = torch.tensor([[A], [B_]])
    adv = torch.tensor([[U], [A]])
    loss, terms = adv_en_loss_from_logits(clean, adv, torch.tensor([1]), "unified")
    assert loss.item() == pytest.approx(math.log(2) + math.log(8 / 5), abs=1e-6)
    assert terms["adv"].item() == pytest.approx(math.log(8 / 5), abs=1e-6)
    with pytest.raises(ValueError):
        adv_en_loss_from_logits(clean, adv, torch.tensor([1]), "mean")


def test_unified_couples_members_and_member_sum_does_not() -> None:
    """Which parameters get gradient from which term: member_sum's gradient for member 1 depends only on
    member 1's logits; the unified loss's depends on the other member's too (f^en mixes them)."""
    y = torch.tensor([1, 0])
    z1 = torch.tensor([[[0.3, 1.0], [2.0, -1.0]]], requires_grad=True)
    for form, coupled in (("member_sum", False), ("unified", True)):
        grads = []
        for other in (torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[3.0, -3.0], [1.0, 2.0]]])):
            clean = torch.cat([z1, other])
            loss, _ = adv_en_loss_from_logits(clean, clean.detach(), y, form)
            grads.append(torch.autograd.grad(loss, z1)[0])
        assert torch.allclose(grads[0], grads[1]) != coupled, form


def test_loss_uses_pgd_against_the_averaged_softmax() -> None:
    method = make(2, steps=3)
    net = TrainNet([Tiny(1), Tiny(2)], {}, method)
    x, y = batch()
    out = method.loss(net, x, y, ctx_for(8))
    ctx = ctx_for(8)
    eps, alpha = method.attack.draw(ctx.generator)
    noise = random_start_noise(ctx, 8, 1, (1, 4, 4))[0]
    members = list(net.members)
    x_en = pgd_linf(lambda z: F.nll_loss(ensemble_log_probs(members, z), y, reduction="sum"), x, eps, alpha,
                    3, noise)
    expected = sum(F.cross_entropy(m(x), y) + F.cross_entropy(m(x_en), y) for m in members)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert (x_en - x).abs().max() <= eps + 1e-6
    assert F.nll_loss(ensemble_log_probs(members, x_en), y) > F.nll_loss(ensemble_log_probs(members, x), y)
    out.loss.backward()
    for m in members:  # both terms reach every member
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_sharded_batch_gives_the_same_gradient_as_the_whole_batch() -> None:
    for form in ("member_sum", "unified"):
        method = make(2, steps=3, adv_en_loss=form)
        x, y = batch()
        full = TrainNet([Tiny(1), Tiny(2)], {}, method)
        method.loss(full, x, y, ctx_for(8)).loss.backward()
        acc = [torch.zeros_like(p) for p in full.parameters()]
        for rank in range(2):
            net = TrainNet([Tiny(1), Tiny(2)], {}, method)
            sl = slice(4 * rank, 4 * rank + 4)
            method.loss(net, x[sl], y[sl], ctx_for(4, rank=rank, world=2, offset=4 * rank, global_batch=8)
                        ).loss.backward()
            for a, p in zip(acc, net.parameters(), strict=True):
                a += p.grad / 2
        for a, p in zip(acc, full.parameters(), strict=True):
            assert torch.allclose(a, p.grad, atol=1e-5), form


def test_single_member_both_forms_are_adv() -> None:
    x, y = batch()
    losses = []
    for form in ("member_sum", "unified"):
        method = make(1, steps=2, adv_en_loss=form)
        net = TrainNet([Tiny(3)], {}, method)
        losses.append(method.loss(net, x, y, ctx_for(8)).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


def test_hyperparameters_validated_and_described() -> None:
    spec = TrainSpec.model_validate({"method": "adv_en", "hyperparameters": {}})
    assert spec.hyperparameters["adv_en_loss"] == "member_sum" and spec.hyperparameters["steps"] == 10
    for hp, field in (({"adv_en_loss": "mean"}, "adv_en_loss"), ({"eps": 2}, "eps"), ({"steps": 0}, "steps")):
        with pytest.raises(ValidationError) as e:
            TrainSpec.model_validate({"method": "adv_en", "hyperparameters": hp})
        assert any(".".join(map(str, err["loc"])).endswith(field) for err in e.value.errors())
    d = next(m for m in describe_methods() if m["name"] == "adv_en")
    assert d["default_combine"] == "mean_probs" and d["hyperparameters"]["adv_en_loss"]["description"]
    m = get_method("adv_en").from_spec_dict({}, members=2, num_classes=10, dataset="mnist",
                                            architecture="lenet5")
    assert m.attack.draw(torch.Generator()) == pytest.approx((0.3, 0.075))
