"""ADV-EN: PGD adversarial training of the whole ensemble, the CCE paper's baseline (spec ``specs/cce.md``
§2.6, §2.7, §2.8 and correction 1 / §8 A16).

One PGD attack per step against the ensemble ``f^en`` (mean of the member softmax outputs), ascending
``−log f^en_y``, with the same training-attack settings as CCE (ε, η, k per data set, one uniform
random start, ground-truth labels, crafted in eval mode). The loss is either

* ``member_sum`` (default, the released code, [code]): Σ_n [C(f^n(x), y) + C(f^n(x^en_a), y)], or
* ``unified`` (the paper's "entire ensemble treated as one model"): −log f^en_y(x) − log f^en_y(x^en_a),

each a batch mean. Inference is the mean of the member softmax outputs. With one member both forms
are ADV, Madry training of a single model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ensemble_core.attacks import crafting_mode, ensemble_log_probs, pgd_linf
from ensemble_core.data import TensorDataset
from ensemble_core.methods import register_method
from ensemble_core.methods.base import LossOutput, Method, Stage, StepContext, TrainNet
from ensemble_core.methods.cce import (
    AdversarialTrainingHyperparameters,
    adversarial_diagnostics,
    member_forwards,
    random_start_noise,
    resolve_training_attack,
)


class ADVENHyperparameters(AdversarialTrainingHyperparameters):
    adv_en_loss: Literal["member_sum", "unified"] = Field("member_sum", description=(
        "member_sum = Σ_n [C(f^n(x)) + C(f^n(x^en_a))] (the released code, default); unified = "
        "−log f^en_y(x) − log f^en_y(x^en_a) with f^en the mean softmax (the paper's wording, spec A16)"))


def adv_en_loss_from_logits(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor,
                            form: str = "member_sum") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ADV-EN objective from logits ``clean``, ``adv`` of shape ``(N, B, C)`` (members on x and x^en_a).

    Returns the scalar and the named terms ``clean`` and ``adv`` (each a batch mean; summed over
    members for ``member_sum``, of the ensemble for ``unified``).
    """
    n = clean.shape[0]
    if form == "member_sum":
        yy = y.repeat(n)
        c = F.cross_entropy(clean.flatten(0, 1), yy, reduction="none").view(n, -1).mean(-1).sum()
        a = F.cross_entropy(adv.flatten(0, 1), yy, reduction="none").view(n, -1).mean(-1).sum()
    elif form == "unified":
        def nll_en(z: torch.Tensor) -> torch.Tensor:
            lp = torch.logsumexp(z.log_softmax(-1), 0) - torch.log(torch.tensor(float(n), device=z.device))
            return F.nll_loss(lp, y)

        c, a = nll_en(clean), nll_en(adv)
    else:
        raise ValueError(f"form must be 'member_sum' or 'unified', got {form!r}")
    return c + a, {"clean": c.detach(), "adv": a.detach()}


@register_method
class ADVEN(Method):
    name = "adv_en"
    title = "ADV-EN: adversarial training of the whole ensemble"
    summary = ("PGD adversarial training against the averaged-softmax ensemble (the CCE paper's ADV-EN "
               "baseline); loss as in the released code (sum of member CEs) or the paper's unified form.")
    spec_file = "specs/cce.md"
    Hyperparameters = ADVENHyperparameters
    default_combine = "mean_probs"
    min_members = 1  # N = 1 is ADV

    def __init__(self, hp: ADVENHyperparameters, **kwargs: Any) -> None:  # type: ignore[override]
        super().__init__(hp, **kwargs)
        self.hp: ADVENHyperparameters = hp
        self.attack = resolve_training_attack(hp, self.dataset, self.architecture)

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Spec §2.7 ``adv_en_step``: one PGD on ``log f^en`` (unwrapped members, stated BN mode, random
        start from ``ctx.global_rand``), then the ``adv_en_loss`` form on clean and adversarial logits."""
        atk = self.attack
        members = net.trainable()
        eps, alpha = atk.draw(ctx.generator)
        noise = random_start_noise(ctx, x.shape[0], 1, tuple(x.shape[1:]))[0] if atk.random_start else None
        with crafting_mode(members, atk.bn_mode):
            if atk.label == "pred":
                with torch.no_grad():
                    y_att = ensemble_log_probs(members, x).argmax(-1)
            else:
                y_att = y
            x_en = pgd_linf(lambda z: F.nll_loss(ensemble_log_probs(members, z), y_att, reduction="sum"),
                            x, eps, alpha, atk.steps, noise)
        logits = member_forwards(members, [x, x_en])
        clean = torch.stack([z[0] for z in logits])
        adv = torch.stack([z[1] for z in logits])
        loss, terms = adv_en_loss_from_logits(clean, adv, y, self.hp.adv_en_loss)
        with torch.no_grad():
            lp_adv = torch.logsumexp(adv.log_softmax(-1), 0)
            terms["acc_en_adv"] = (lp_adv.argmax(-1) == y).float().mean()
            terms["eps"] = torch.tensor(eps, device=x.device)
        return LossOutput(loss, terms)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """k PGD steps on the ensemble (each an input gradient through every member), then a
        forward+backward of every member on the clean and the adversarial batch; with
        ``attack_label = pred`` one more no-grad forward per member (issue 13)."""
        n = float(len(stage.train_members))
        cost = {"input_grad": n * self.attack.steps, "fwd_bwd": 2 * n}
        if self.attack.label == "pred":
            cost["fwd"] = n
        return cost

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Resolved training attack, member transferability and the entropy detector (as for CCE)."""
        out = adversarial_diagnostics(self, self.hp, self.attack, net, test, device)
        out["adv_en_loss"] = self.hp.adv_en_loss
        return out
