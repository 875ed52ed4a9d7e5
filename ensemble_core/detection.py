"""Entropy-based adversarial detection (CCE spec §3 "Adversarial detection", §8 A20).

CCE's detection mode (CCE-DM) makes members agree confidently on clean inputs and give flat outputs
on adversarial ones, so the Shannon entropy of the ensemble prediction ``H(f^en(x))`` (``f^en`` the
mean of the member softmax outputs, entropy in nats) is the detector score: a higher score means
"more likely adversarial". The paper fixes no threshold; it sweeps it and reports the ROC AUC
(Pang et al. 2018/2019). The attacks are ordinary white-box attacks on ``f^en`` that do not know
about the detector.

Everything here is a pure function of tensors (or of member modules for scoring), so an evaluate
job can call :func:`entropy_detection` with the clean images, their labels and any adversarial
copies it crafted, whatever the method that trained the ensemble.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ensemble_core.attacks import ensemble_log_probs


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Row-wise Shannon entropy ``-Σ_c p_c log p_c`` (nats) from log-probabilities ``(N, C)``.

    Works from log-probabilities so that ``p_c = 0`` contributes exactly 0 (never ``0 · -inf``).
    """
    p = log_probs.exp()
    return -(p * log_probs).nan_to_num(0.0).sum(-1)


def ensemble_entropy(member_logits: torch.Tensor) -> torch.Tensor:
    """``H(f^en(x))`` per sample from the members' logits stacked as ``(K, N, C)``."""
    lp = torch.logsumexp(member_logits.log_softmax(-1), dim=0) - math.log(member_logits.shape[0])
    return entropy_from_log_probs(lp)


def roc_auc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of the rule "score > τ means positive", swept over τ.

    Equals P(score of a random positive > score of a random negative) + ½ P(tie) (Mann–Whitney U
    with average ranks), which is the exact area under the empirical ROC curve. Needs at least one
    negative and one positive.
    """
    neg = negative.detach().double().flatten().cpu()
    pos = positive.detach().double().flatten().cpu()
    if neg.numel() == 0 or pos.numel() == 0:
        raise ValueError("roc_auc needs at least one negative and one positive score")
    scores = torch.cat([neg, pos])
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average rank (1-based) over each run of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(negative: torch.Tensor, positive: torch.Tensor) -> dict[str, list[float]]:
    """Empirical ROC points (false-positive rate, true-positive rate) for every distinct threshold."""
    neg = negative.detach().double().flatten().cpu()
    pos = positive.detach().double().flatten().cpu()
    thresholds = torch.unique(torch.cat([neg, pos])).flip(0)
    fpr = [0.0] + [float((neg >= t).double().mean()) for t in thresholds]
    tpr = [0.0] + [float((pos >= t).double().mean()) for t in thresholds]
    return {"fpr": fpr, "tpr": tpr, "thresholds": [math.inf] + thresholds.tolist()}


@torch.no_grad()
def _scores_and_predictions(members: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
                            batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    ents, preds, classes = [], [], 0
    for i in range(0, x.shape[0], batch_size):
        lp = ensemble_log_probs(members, x[i : i + batch_size])
        ents.append(entropy_from_log_probs(lp))
        preds.append(lp.argmax(-1))
        classes = lp.shape[-1]
    return torch.cat(ents), torch.cat(preds), classes


def entropy_detection(members: Sequence[Callable[[torch.Tensor], torch.Tensor]], x_clean: torch.Tensor,
                      y: torch.Tensor, x_adv: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """ROC AUC of the ensemble-entropy detector on clean (negatives) vs adversarial (positives) inputs.

    ``auc`` (spec §8 A20's main protocol): every clean image is a negative, every attacked image a
    positive. ``auc_successful``: negatives are the clean images the ensemble classifies correctly,
    positives the adversarial images that fool it (Pang et al.'s variant); ``None`` when either set
    is empty. Members are called as given (put them in eval mode first). AUCs are in [0, 1].
    """
    if x_clean.shape != x_adv.shape or y.shape[0] != x_clean.shape[0]:
        raise ValueError("x_clean, x_adv and y must describe the same images")
    h_clean, p_clean, num_classes = _scores_and_predictions(members, x_clean, batch_size)
    h_adv, p_adv, _ = _scores_and_predictions(members, x_adv, batch_size)
    y = y.to(p_clean.device)
    ok_clean, fooled = p_clean == y, p_adv != y
    succ = None
    if ok_clean.any() and fooled.any():
        succ = roc_auc(h_clean[ok_clean], h_adv[fooled])
    return {
        "score": "entropy of the mean member softmax, nats (higher = flagged adversarial)",
        "auc": roc_auc(h_clean, h_adv),
        "auc_successful": succ,
        "n_clean": int(h_clean.numel()), "n_adversarial": int(h_adv.numel()),
        "n_clean_correct": int(ok_clean.sum()), "n_adversarial_successful": int(fooled.sum()),
        "mean_entropy_clean": float(h_clean.mean()), "mean_entropy_adversarial": float(h_adv.mean()),
        "max_entropy": math.log(num_classes),
    }


__all__ = ["ensemble_entropy", "entropy_detection", "entropy_from_log_probs", "roc_auc", "roc_curve"]
