"""The ``Ensemble`` module and its combine rules (inference rules).

A combine rule maps the members' logits, stacked as ``(K, N, C)``, to one ``(N, C)`` score tensor,
and to predictions where ``-1`` means the rule abstains (a failed majority counts as wrong). Rules
that are not differentiable, or whose output is not a good attack target, name a differentiable
*attack surrogate*: evaluation attacks the surrogate and scores the examples on the deployed rule.
Methods may register their own rules (DKD's boosted vote lives in ``methods/dkd.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VoteInfo:
    """What a vote rule counts, so that evaluation can attack the vote itself (docs/evaluation.md).

    ``voters`` selects the voting members' logits from all members' ``(K, N, C)``; ``top_n`` is the
    number of classes each voter votes for in the rule's last resort (1 for a plain vote, n for DKD's
    boosted top-n vote); ``kind`` is how the votes decide:

    * ``majority``: a strict majority (> K/2) of top-1 votes, else abstain (wrong);
    * ``plurality``: the most top-1 votes (ties by summed probability);
    * ``majority_or_mean``: a strict majority, else the argmax of the mean softmax (PARL A9);
    * ``boosted``: a strict top-1 majority, else a strict majority of top-n votes, else abstain (DKD §3.3).
    """

    voters: Callable[[torch.Tensor], torch.Tensor]
    kind: str = "majority"
    top_n: int = 1


def all_members(z: torch.Tensor) -> torch.Tensor:
    return z


@dataclass(frozen=True)
class CombineRule:
    name: str
    scores: Callable[[torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    differentiable: bool = True
    outputs: str = "logits"  # what scores are: logits, probs, log_probs, votes
    attack_surrogate: str | None = None  # rule attacked in place of this one (None: itself)
    description: str = ""
    vote: VoteInfo | None = None  # set on vote rules: who votes and how (vote-aware attacks read it)

    def predict_labels(self, member_logits: torch.Tensor) -> torch.Tensor:
        if self.predict is not None:
            return self.predict(member_logits)
        return self.scores(member_logits).argmax(1)


_RULES: dict[str, CombineRule] = {}


def register_combine(rule: CombineRule) -> CombineRule:
    _RULES[rule.name] = rule
    return rule


def combine_rule(name: str) -> CombineRule:
    if name not in _RULES:
        raise ValueError(f"unknown combine rule {name!r}; expected one of {', '.join(sorted(_RULES))}")
    return _RULES[name]


def combine_names() -> list[str]:
    return sorted(_RULES)


def _mean_logits(z: torch.Tensor) -> torch.Tensor:
    return z.mean(0)


def _mean_probs(z: torch.Tensor) -> torch.Tensor:
    return z.softmax(-1).mean(0)


def _log_mean_probs(z: torch.Tensor) -> torch.Tensor:
    # log(mean_k softmax(z_k)) computed stably: logsumexp over members of log-softmax, minus log K.
    return torch.logsumexp(z.log_softmax(-1), dim=0) - torch.log(torch.tensor(float(z.shape[0]), device=z.device))


def vote_counts(z: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` number of members whose top-1 class is each class."""
    k, n, c = z.shape
    return nn.functional.one_hot(z.argmax(-1), c).sum(0).to(z.dtype)


def _vote_scores(z: torch.Tensor) -> torch.Tensor:
    return vote_counts(z) / z.shape[0]


def _majority_predict(z: torch.Tensor) -> torch.Tensor:
    """Strict majority (> K/2) of top-1 votes, else -1 (failed majority; DKD spec §3.3)."""
    counts = vote_counts(z)
    best, label = counts.max(1)
    return torch.where(best > z.shape[0] / 2, label, torch.full_like(label, -1))


def _plurality_predict(z: torch.Tensor) -> torch.Tensor:
    """Most votes; ties broken by the summed softmax probability."""
    counts = vote_counts(z)
    probs = z.softmax(-1).sum(0)
    tied = counts == counts.max(1, keepdim=True).values
    return torch.where(tied, probs, torch.full_like(probs, -1.0)).argmax(1)


register_combine(CombineRule("mean_logits", _mean_logits, description="average of the members' logits"))
register_combine(CombineRule("mean_probs", _mean_probs, outputs="probs", attack_surrogate="log_mean_probs",
                             description="average of the members' softmax probabilities"))
register_combine(CombineRule("log_mean_probs", _log_mean_probs, outputs="log_probs",
                             description="log of the average softmax probability (same argmax as mean_probs)"))
register_combine(CombineRule("vote", _vote_scores, _majority_predict, differentiable=False, outputs="votes",
                             attack_surrogate="log_mean_probs", vote=VoteInfo(all_members, "majority"),
                             description="strict-majority vote of top-1 labels; no majority abstains (wrong)"))
register_combine(CombineRule("plurality", _vote_scores, _plurality_predict, differentiable=False, outputs="votes",
                             attack_surrogate="log_mean_probs", vote=VoteInfo(all_members, "plurality"),
                             description="plurality vote of top-1 labels, ties by summed probability"))


class Ensemble(nn.Module):
    """Members plus a combine rule; ``forward`` returns one ``(N, C)`` tensor."""

    def __init__(self, members: list[nn.Module] | nn.ModuleList, combine: str = "mean_logits") -> None:
        super().__init__()
        self.members = members if isinstance(members, nn.ModuleList) else nn.ModuleList(members)
        self.rule = combine_rule(combine)

    @property
    def combine(self) -> str:
        return self.rule.name

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, N, C)`` logits of every member."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule.scores(self.member_logits(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels under the deployed rule; ``-1`` where a vote abstains."""
        return self.rule.predict_labels(self.member_logits(x))

    def with_combine(self, combine: str) -> Ensemble:
        """The same members (shared, not copied) under another rule."""
        other = copy.copy(self)
        other._modules = dict(self._modules)
        other.rule = combine_rule(combine)
        return other

    def attack_target(self) -> Ensemble:
        """What a white-box attack should differentiate: the rule itself or its stated surrogate."""
        return self.with_combine(self.rule.attack_surrogate) if self.rule.attack_surrogate else self
