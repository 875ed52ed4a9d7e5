"""ADP: adaptive diversity promoting regulariser (Pang, Xu, Du, Chen, Zhu, ICML 2019, "Improving adversarial
robustness via promoting ensemble diversity", arXiv 1901.08846). Documentation: ``docs/methods/adp.md``.

All members are trained jointly on

    Σ_i CE_i  −  α · mean_b H(f^en(x_b))  −  β · mean_b log det(M̃_bᵀ M̃_b + δ·I_N)

* ``f^en`` is the mean of the members' softmax outputs and ``H`` its Shannon entropy (the ensemble
  entropy, with the reference code's ``log(p + 1e-20)``);
* column i of ``M̃_b`` is member i's softmax vector on sample b **with the true class removed**,
  L2-normalised; ``det(M̃ᵀM̃)`` is the paper's ensemble diversity ED (the squared volume spanned by the
  members' non-maximal predictions), and δ = 1e-6 keeps the log finite (the reference code adds δ·I
  inside the determinant).

Settings (α = 2, β = 0.5, δ = 1e-6; summed CE) are the ADP_{2,0.5} of the paper as the public re-runs
use them (shared ``specs/pdd.md`` §5.4, ``specs/cldl.md`` §6.3, ``specs/parl.md`` §7 A19, ``specs/cce.md``
§2.7). This is the plain (not adversarially trained) ADP those papers compare with. Inference: the mean of
the members' softmax outputs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, StepContext, TrainNet
from ensemble_core.methods.gal import DIAGNOSTIC_IMAGES, reduce_ce

LOG_OFFSET = 1e-20  # the reference code's offset inside the entropy's log
NORMALIZE_EPS = 1e-12  # Keras l2_normalize: x / sqrt(max(Σx², 1e-12)), guards an all-zero (underflowed) vector


class ADPHyperparameters(Hyperparameters):
    alpha: float = Field(2.0, ge=0.0, le=100.0,
                         description="α (the reference code's --lamda): weight of the ensemble entropy "
                                     "H(mean softmax), maximised")
    beta: float = Field(0.5, ge=0.0, le=100.0,
                        description="β (the reference code's --log_det_lamda): weight of the log ensemble "
                                    "diversity log det(M̃ᵀM̃ + δI), maximised")
    det_offset: float = Field(1e-6, gt=0.0, le=1.0,
                              description="δ: added to the Gram matrix's diagonal inside the log-determinant "
                                          "(reference code 1e-6)")
    ce_reduction: Literal["sum", "mean"] = Field(
        "sum", description="members' CEs summed (Pang et al.'s code and the DVERGE/TRS re-implementations) or "
                           "averaged (the PDD code's re-run)")


def ensemble_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of the mean prediction: ``probs (N, B, C)`` → ``(B,)``."""
    ens = probs.mean(0)
    return -(ens * torch.log(ens + LOG_OFFSET)).sum(-1)


def non_maximal_predictions(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``M̃`` per sample: ``probs (N, B, C)`` → ``(B, N, C−1)``, true class removed, each row L2-normalised."""
    n, b, c = probs.shape
    keep = torch.ones(b, c, dtype=torch.bool, device=probs.device)
    keep[torch.arange(b, device=probs.device), y] = False
    m = probs.transpose(0, 1)[keep.unsqueeze(1).expand(b, n, c)].view(b, n, c - 1)
    return m * torch.rsqrt(m.pow(2).sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS))


def log_ensemble_diversity(probs: torch.Tensor, y: torch.Tensor, det_offset: float = 1e-6) -> torch.Tensor:
    """Per-sample ``log det(M̃ M̃ᵀ + δ·I_N)`` (``(B,)``), computed in float64 (a tiny N×N matrix per sample)."""
    m = non_maximal_predictions(probs, y).double()
    n = m.shape[1]
    gram = m @ m.transpose(1, 2) + det_offset * torch.eye(n, dtype=m.dtype, device=m.device)
    return torch.logdet(gram).to(probs.dtype)


def adp_terms(logits: list[torch.Tensor] | torch.Tensor, y: torch.Tensor, hp: ADPHyperparameters
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ADP objective from the members' logits (``N`` tensors ``(B, C)``); returns (loss, terms in graph).

    Terms: ``ce_i`` (member i's batch-mean CE), ``ce`` (their sum or mean), ``entropy`` (batch-mean
    ensemble entropy) and ``log_det`` (batch-mean log-determinant).
    """
    z = torch.stack(list(logits))  # (N, B, C)
    ces = torch.stack([F.cross_entropy(zi, y) for zi in z])
    ce = reduce_ce(ces, hp.ce_reduction)
    probs = z.softmax(-1)
    entropy = ensemble_entropy(probs).mean()
    log_det = log_ensemble_diversity(probs, y, hp.det_offset).mean()
    terms = {"ce": ce, "entropy": entropy, "log_det": log_det, **{f"ce_{i}": c for i, c in enumerate(ces)}}
    return ce - hp.alpha * entropy - hp.beta * log_det, terms


@register_method
class ADP(Method):
    name = "adp"
    title = "ADP: adaptive diversity promoting ensemble"
    summary = ("Members trained jointly on their cross-entropies minus α times the entropy of the averaged "
               "prediction minus β times the log-determinant of the Gram matrix of their normalised non-true-"
               "class predictions; mean of softmax outputs. Pang et al. 2019.")
    Hyperparameters = ADPHyperparameters
    default_combine = "mean_probs"
    min_members = 2  # the diversity determinant needs at least two members

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """``Σ_i CE_i − α·H(f^en) − β·log(ED)``: one forward per member; CE_i updates member i only, the
        entropy and the log-determinant couple all members."""
        hp: ADPHyperparameters = self.hp  # type: ignore[assignment]
        ids = net.stage.train_members
        loss, terms = adp_terms([m(x) for m in net.trainable()], y, hp)
        out = {k: v for k, v in terms.items() if not k.startswith("ce_")}
        out.update({f"ce_{ids[int(k[3:])]}": v for k, v in terms.items() if k.startswith("ce_")})
        return LossOutput(loss, out)

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Ensemble entropy and log ensemble diversity of the final members (eval mode, first 256 report
        images), with the same δ as training."""
        hp: ADPHyperparameters = self.hp  # type: ignore[assignment]
        was_training = net.training
        net.eval()
        sub = test.subset(list(range(min(DIAGNOSTIC_IMAGES, len(test)))))
        ent, ld, seen = 0.0, 0.0, 0
        with torch.no_grad():
            for xb, yb in iterate_eval(sub, 128, device):
                probs = torch.stack([m(xb) for m in net.members]).softmax(-1)
                ent += float(ensemble_entropy(probs).double().sum())
                ld += float(log_ensemble_diversity(probs, yb, hp.det_offset).double().sum())
                seen += xb.shape[0]
        net.train(was_training)
        if seen == 0:
            return {"n_images": 0}
        return {"n_images": seen, "ensemble_entropy_mean": ent / seen, "log_det_mean": ld / seen}
