"""Every combine rule checked on hand-made logits."""

import math

import pytest
import torch

from ensemble_core.ensemble import Ensemble, combine_rule, vote_counts


def stack(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)  # (K, N, C)


# K=3 members, N=2 samples, C=3 classes
Z = stack(
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    [[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]],
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
)


def test_mean_logits_by_hand() -> None:
    out = combine_rule("mean_logits").scores(Z)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_mean_probs_by_hand() -> None:
    e = math.e
    p_member0_s0 = [e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)]
    p_member1_s0 = [1 / (e**3 + 2), e**3 / (e**3 + 2), 1 / (e**3 + 2)]
    p_member2_s0 = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    expected0 = [sum(col) / 3 for col in zip(p_member0_s0, p_member1_s0, p_member2_s0, strict=True)]
    out = combine_rule("mean_probs").scores(Z)
    assert torch.allclose(out[0], torch.tensor(expected0), atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_log_mean_probs_is_log_of_mean_probs_and_non_positive() -> None:
    lmp = combine_rule("log_mean_probs").scores(Z)
    assert torch.allclose(lmp, combine_rule("mean_probs").scores(Z).log(), atol=1e-6)
    assert (lmp <= 0).all()
    # stable for huge logits, where softmax-then-log would underflow to -inf
    big = stack([[1000.0, 0.0]], [[0.0, 1000.0]])
    assert torch.isfinite(combine_rule("log_mean_probs").scores(big)).all()
    assert torch.allclose(combine_rule("log_mean_probs").scores(big), torch.tensor([[math.log(0.5)] * 2]), atol=1e-5)


def test_vote_counts_and_strict_majority() -> None:
    # sample 0: top-1 = (0, 1, 0) -> class 0 has 2 of 3 votes; sample 1: (1, 2, 0) -> no majority
    assert vote_counts(Z).tolist() == [[2, 1, 0], [1, 1, 1]]
    rule = combine_rule("vote")
    assert torch.allclose(rule.scores(Z), torch.tensor([[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert rule.predict_labels(Z).tolist() == [0, -1]  # failed majority abstains (counts as wrong)
    assert not rule.differentiable and rule.attack_surrogate == "log_mean_probs"


def test_plurality_breaks_ties_by_summed_probability() -> None:
    # sample 1 is a three-way tie; the summed softmax probabilities decide
    probs = Z.softmax(-1).sum(0)[1]
    assert combine_rule("plurality").predict_labels(Z).tolist() == [0, int(probs.argmax())]


def test_even_members_need_strict_majority() -> None:
    z = stack([[1.0, 0.0]], [[0.0, 1.0]])  # 1 vote each of 2: not > K/2
    assert combine_rule("vote").predict_labels(z).tolist() == [-1]


class Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_ensemble_module_forward_predict_and_surrogate() -> None:
    ens = Ensemble([Fixed(Z[k]) for k in range(3)], "vote")
    x = torch.zeros(2, 1)
    assert ens(x).shape == (2, 3)
    assert ens.predict(x).tolist() == [0, -1]
    target = ens.attack_target()
    assert target.combine == "log_mean_probs" and ens.combine == "vote"  # the original keeps its rule
    assert target.members is ens.members  # shares the members, no copy
    assert torch.allclose(ens.with_combine("mean_logits")(x), Z.mean(0))


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown combine rule"):
        combine_rule("median")
