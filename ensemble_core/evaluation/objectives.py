"""Attack objectives on the members' logits: what an iterative attack *maximises* per example.

Every objective takes the members' logits ``z`` stacked as ``(K, N, C)``, the labels ``y`` ``(N,)`` and
returns one value per example ``(N,)``; the attack loop (:mod:`ensemble_core.evaluation.engine`) sums (or,
for cross-entropy, averages, as torchattacks does) and ascends it. Working on member logits lets one
forward pass serve both the gradient and the scoring of the iterate on the deployed rule.

* ``ce`` / ``cw`` / ``dlr`` act on the rule's differentiable *view* (``Ensemble.attack_target()``: mean
  logits, or log of mean probabilities): cross-entropy; the CW margin ``min(max_{j≠y} o_j − o_y, κ)`` with
  the true class masked by ``−inf`` (right on non-positive outputs); Croce & Hein's DLR loss
  ``−(o_y − max_{j≠y} o_j) / (o_π1 − o_π3)`` (shift- and scale-invariant, needs ≥ 3 classes).
* ``vote`` attacks a vote rule itself (docs/evaluation.md, "Vote-aware losses"). With ``K`` voters and the
  rule's :class:`~ensemble_core.ensemble.VoteInfo`, it is a member-wise hinge on the ``r`` voters that are
  closest to changing their vote, where ``r`` is the number of votes that must change for the rule to
  stop returning ``y``:

  - ``majority`` / ``boosted`` (top-n): ``r = ⌈K/2⌉`` voters must drop ``y`` out of their top-``n``
    (``n = 1`` for a plain vote). Then ``y`` has at most ``⌊K/2⌋ ≤ K/2`` (top-1 or top-n) votes, so it has
    no strict majority at any stage of the rule, and the rule answers another class or abstains (wrong).
    Voter k's margin is ``z_k,y − (n-th largest z_k,j, j ≠ y)``: positive iff ``y`` is in its top-n.
  - ``plurality`` / ``majority_or_mean``: ``r = ⌊K/2⌋ + 1`` voters must vote for one other class ``t``
    (the runner-up of the summed softmax, re-chosen at every step), which then has a strict majority.
    Voter k's margin is ``max_{j≠t} z_k,j − z_k,t``: positive iff it does not vote ``t``.

  The objective is ``−Σ_{r smallest margins} max(margin, −κ)``: the ``r`` voters nearest to flipping are
  pushed across their own boundaries (by ``κ``), whatever the other voters do. Log-mean-probabilities
  attacks can be stopped by one confident member whose gradient dominates the mean; this loss ignores it.
* ``softvote`` is a low-temperature soft vote, a differentiable view of the vote: vote shares
  ``s_c = mean_k softmax(ẑ_k / T)_c`` over the voters, with each voter's logits divided by their
  (detached) standard deviation over classes so that ``T`` means the same for every member; objective
  ``log max_{c≠y} s_c − log s_y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ensemble_core.ensemble import CombineRule, VoteInfo

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

VIEW_LOSSES = ("ce", "cw", "dlr")
VOTE_LOSSES = ("vote", "softvote")
ALL_LOSSES = VIEW_LOSSES + VOTE_LOSSES


def cw_objective(outputs: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per-sample CW objective to *maximise*: ``min(max_{j≠y} o_j − o_y, κ)`` (Carlini & Wagner's f6, negated).

    The true class is masked with ``-inf`` before the max, so the margin is right when every output is
    non-positive (log of mean probabilities), where ``max((1 − onehot)·o)`` would select a masked zero.
    It is capped at ``κ``: once an example is misclassified with confidence ``κ`` it stops pulling.
    """
    true = outputs.gather(1, y[:, None]).squeeze(1)
    other = outputs.masked_fill(F.one_hot(y, outputs.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa)


def dlr_objective(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's (2020) difference-of-logits-ratio loss, to maximise: ``−(o_y − max_{j≠y} o_j) / (o_π1 − o_π3)``.

    ``o_π1 ≥ o_π2 ≥ o_π3`` are the sorted outputs. Invariant to shifting and positive scaling of the outputs,
    so it behaves alike on logits and on log-probabilities. Needs at least 3 classes.
    """
    if outputs.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    srt = outputs.sort(dim=1, descending=True).values
    true = outputs.gather(1, y[:, None]).squeeze(1)
    other = outputs.masked_fill(F.one_hot(y, outputs.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def vote_margins(v: torch.Tensor, y: torch.Tensor, vote: VoteInfo) -> tuple[torch.Tensor, int]:
    """Per-voter margins ``(K, N)`` (positive = the voter still supports ``y``) and ``r``, the votes to change.

    ``v``: the voters' logits ``(K, N, C)``. See the module docstring for the two families of rules.
    """
    k, n, c = v.shape
    onehot = F.one_hot(y, c).bool().unsqueeze(0).expand(k, n, c)
    if vote.kind in ("majority", "boosted"):
        top_n = max(1, min(vote.top_n, c - 1))
        others = v.masked_fill(onehot, float("-inf"))
        nth = others.topk(top_n, dim=-1).values[..., top_n - 1]
        return v.gather(2, y.view(1, n, 1).expand(k, n, 1)).squeeze(2) - nth, math.ceil(k / 2)
    if vote.kind in ("plurality", "majority_or_mean"):
        with torch.no_grad():
            t = v.softmax(-1).sum(0).masked_fill(onehot[0], float("-inf")).argmax(1)  # (N,)
        t_onehot = F.one_hot(t, c).bool().unsqueeze(0).expand(k, n, c)
        vt = v.gather(2, t.view(1, n, 1).expand(k, n, 1)).squeeze(2)
        return v.masked_fill(t_onehot, float("-inf")).amax(2) - vt, k // 2 + 1
    raise ValueError(f"unknown vote kind {vote.kind!r}")


def vote_objective(z: torch.Tensor, y: torch.Tensor, vote: VoteInfo, kappa: float = 0.0) -> torch.Tensor:
    """The vote-aware hinge (module docstring): ``−Σ`` over the ``r`` smallest voter margins of ``max(m, −κ)``."""
    margins, r = vote_margins(vote.voters(z), y, vote)
    hinge = margins.clamp(min=-kappa)
    return -hinge.topk(min(r, hinge.shape[0]), dim=0, largest=False).values.sum(0)


def softvote_objective(z: torch.Tensor, y: torch.Tensor, vote: VoteInfo, temperature: float = 0.25) -> torch.Tensor:
    """Low-temperature soft vote (module docstring): ``log max_{c≠y} s_c − log s_y``."""
    v = vote.voters(z)
    scale = v.detach().std(dim=-1, keepdim=True).clamp_min(1e-6)
    logs = torch.logsumexp((v / scale / temperature).log_softmax(-1), dim=0) - math.log(v.shape[0])
    true = logs.gather(1, y[:, None]).squeeze(1)
    other = logs.masked_fill(F.one_hot(y, logs.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def applicable(loss: str, deployed: CombineRule) -> bool:
    """Whether ``loss`` applies to a model deployed with ``deployed`` (vote losses need a vote rule)."""
    return loss in VIEW_LOSSES or (loss in VOTE_LOSSES and deployed.vote is not None)


def make_objective(loss: str, view: CombineRule, deployed: CombineRule | None = None, *, kappa: float = 0.0,
                   temperature: float = 0.25) -> Objective:
    """The per-example objective ``f(z, y)`` of ``loss`` for an ensemble attacked through ``view``.

    ``deployed`` is the rule the examples are scored on; the vote losses read its ``vote`` descriptor.
    """
    if loss == "ce":
        return lambda z, y: F.cross_entropy(view.scores(z), y, reduction="none")
    if loss == "cw":
        return lambda z, y: cw_objective(view.scores(z), y, kappa)
    if loss == "dlr":
        return lambda z, y: dlr_objective(view.scores(z), y)
    if loss in VOTE_LOSSES:
        vote = deployed.vote if deployed is not None else None
        if vote is None:
            raise ValueError(f"losses: {loss!r} attacks a vote; the deployed rule "
                             f"{deployed.name if deployed else None!r} is not a vote")
        if loss == "vote":
            return lambda z, y: vote_objective(z, y, vote, kappa)
        return lambda z, y: softvote_objective(z, y, vote, temperature)
    raise ValueError(f"losses: unknown loss {loss!r}; expected one of {', '.join(ALL_LOSSES)}")
