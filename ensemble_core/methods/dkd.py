"""DKD: Diverse Knowledge Distillation, a sequential "reverse distillation" ensemble (spec dkd.md).

Members are trained one at a time (spec §2.6, §3.1). Stage 0 trains the main model M with plain
cross-entropy (Eq. 1). Stage i trains auxiliary A_i from its own random initialisation with
``(1 - ζ)·CE + ζ·mean_p cos(F_p(x), F_{A_i}(x))`` over every earlier member p, all frozen (Eq. 4 read
as in spec §2.5: i predecessor terms of weight ζ/i each). ``F`` is a latent layer close to the
output, by default the penultimate post-activation vector (``MemberNet.features``, spec §2.3).

Inference (spec §3.3): a strict-majority vote of top-1 labels, and the boosted vote DKD* that falls
back on the members' top-n classes (n = 2, spec §8 A7) when top-1 has no majority; a sample with no
majority even then is a failed majority and counts as wrong. Following the spec's correction 1 the
deployed default votes over the auxiliaries only (``include_main_in_vote = false``, spec §3.2): M is
then the teacher/reference, trained and stored as member 0 but not voting.

Diagnostics (``results``): failed majorities (spec §7.1) under both vote rules and both voter sets,
the pairwise cosines of the members' latents, and the Latent Space Separation (spec §6.4, Eqs. 5-6),
the margin 2/‖W‖ of a hard-margin linear SVM between two members' latent clouds.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ensemble_core.data import TensorDataset, iterate_eval
from ensemble_core.ensemble import CombineRule, VoteInfo, all_members, combine_names, register_combine, vote_counts
from ensemble_core.methods import register_method
from ensemble_core.methods.base import Hyperparameters, LossOutput, Method, Stage, StepContext, TrainNet

# Spec §4: "ζ is set to 0.5 and 0.9 for the CIFAR10 and MNIST datasets" [paper]. Fashion-MNIST and the
# synthetic test set share MNIST's shape and Table I network; CIFAR-100 shares CIFAR-10's [recommended].
ZETA_BY_DATASET: dict[str, float] = {"mnist": 0.9, "fashion_mnist": 0.9, "synthetic": 0.9,
                                     "cifar10": 0.5, "cifar100": 0.5}

LatentLayer = Literal["features", "rep"]


# ------------------------------------------------------------------------------------------ loss


def latent_cosine(student: torch.Tensor, other: torch.Tensor, abs_cos: bool = False) -> torch.Tensor:
    """Per-sample cosine similarity of two models' latents for the same inputs (spec §2.3, Eq. 2).

    Both are flattened per sample; a zero vector gives cosine 0 (``eps`` guard, spec §2.3). ``abs_cos``
    is the ablation of spec A4 (not paper-faithful; off by default).
    """
    cos = F.cosine_similarity(student.flatten(1), other.flatten(1), dim=1, eps=1e-8)
    return cos.abs() if abs_cos else cos


def dkd_objective(logits: torch.Tensor, y: torch.Tensor, student_latents: list[torch.Tensor],
                  predecessor_latents: list[list[torch.Tensor]], zeta: float,
                  abs_cos: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DKD loss of one member for one batch (spec §2.2-2.5, Eqs. 1, 3 and 4).

    * no predecessor (stage 0, the main model M): ``CE`` (Eq. 1);
    * predecessors P_i = {M, A_1, ..., A_{i-1}}, |P_i| = i:
      ``(1 - ζ)·CE + Σ_{p∈P_i} (ζ/i)·cos_p`` (Eq. 4; Eq. 3 when i = 1), i.e. ζ times the mean cosine,

    where ``cos_p`` is the batch mean (spec A3) of the per-sample cosine between the student's latent and
    predecessor p's latent, averaged over the configured latent layers (spec §2.3). ``student_latents[l]``
    is the student's layer-l latent; ``predecessor_latents[p][l]`` predecessor p's (constants: computed
    without gradient). Returns the loss and the named terms ``ce``, ``cos`` (the mean over predecessors)
    and ``cos_<p>`` (p = position in ``predecessor_latents``).
    """
    ce = F.cross_entropy(logits, y)
    terms: dict[str, torch.Tensor] = {"ce": ce}
    if not predecessor_latents:
        return ce, terms
    per_pred = []
    for p, layers in enumerate(predecessor_latents):
        if len(layers) != len(student_latents):
            raise ValueError("every predecessor needs one latent per student latent layer")
        cos_p = torch.stack([latent_cosine(s, f.detach(), abs_cos).mean()
                             for s, f in zip(student_latents, layers, strict=True)]).mean()
        terms[f"cos_{p}"] = cos_p
        per_pred.append(cos_p)
    diversity = torch.stack(per_pred).mean()  # = Σ_p (1/i)·cos_p: weights ζ/i add up to ζ (spec §2.5)
    terms["cos"] = diversity
    return (1.0 - zeta) * ce + zeta * diversity, terms


def kd_objective(logits: torch.Tensor, y: torch.Tensor, predecessor_logits: list[torch.Tensor], zeta: float,
                 temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KD comparator's loss of one member (spec §2.8, KD; correction 2), Table III's "KD" ensemble.

    * no predecessor: ``CE`` (Eq. 1, as DKD's M);
    * predecessors P_i, |P_i| = i: ``(1 − ζ)·CE + Σ_{p∈P_i} (ζ/i)·T²·KL(softmax(z_p/T) ‖ softmax(z/T))``,

    Eq. 4 with "pull towards the predecessors' softmax" in place of "push the latents apart"; T = 1 by default
    (no temperature in the paper). KL is the batch mean of the per-sample sums; the predecessors' logits are
    constants. Returns the loss and the named terms ``ce``, ``kl`` (mean over predecessors), ``kl_<p>``.
    """
    ce = F.cross_entropy(logits, y)
    terms: dict[str, torch.Tensor] = {"ce": ce}
    if not predecessor_logits:
        return ce, terms
    log_q = F.log_softmax(logits / temperature, dim=-1)
    per_pred = []
    for p, zp in enumerate(predecessor_logits):
        log_p = F.log_softmax(zp.detach() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
        terms[f"kl_{p}"] = kl
        per_pred.append(kl)
    pull = torch.stack(per_pred).mean()  # weights ζ/i over i predecessors add up to ζ
    terms["kl"] = pull
    return (1.0 - zeta) * ce + zeta * pull, terms


# ------------------------------------------------------------------------------- combine rules


def majority_vote(z: torch.Tensor) -> torch.Tensor:
    """Strict-majority (> K/2) vote of the members' top-1 labels; ``-1`` = failed majority (spec §3.3)."""
    best, label = vote_counts(z).max(1)
    return torch.where(best > z.shape[0] / 2, label, torch.full_like(label, -1))


def topn_counts(z: torch.Tensor, n: int) -> torch.Tensor:
    """``(N, C)`` number of members that have each class among their top-n classes."""
    k, _, c = z.shape
    top = z.topk(min(n, c), dim=-1).indices  # (K, N, n)
    return F.one_hot(top, c).sum(dim=(0, 2)).to(z.dtype)


def boosted_vote(z: torch.Tensor, n: int = 2) -> torch.Tensor:
    """The boosted vote DKD* (spec §3.3; n, tie-break and failure policy from spec §8 A7).

    1. a strict majority of top-1 labels decides; otherwise
    2. every member votes for each of its top-n classes and a class wins with a strict majority of
       members; several winners: the most votes, then the largest summed softmax probability;
    3. no winner: a boosted failed majority, ``-1`` (counts as wrong).
    ``z``: ``(K, N, C)`` member logits.
    """
    k = z.shape[0]
    regular = majority_vote(z)
    counts = topn_counts(z, n)
    probs = z.softmax(-1).sum(0)  # ≤ K < K + 1, so it only orders classes with equal counts
    winners = counts > k / 2
    key = torch.where(winners, counts * (k + 1) + probs, torch.full_like(probs, -1.0))
    boosted = torch.where(winners.any(1), key.argmax(1), torch.full_like(regular, -1))
    return torch.where(regular >= 0, regular, boosted)


def _boosted_scores(z: torch.Tensor, n: int) -> torch.Tensor:
    """Vote shares under the rule in force (top-1 where it has a majority, top-n elsewhere), plus a
    summed-probability bonus below one vote (1/K) that only breaks ties. Predictions (with -1 for a
    failed majority) come from :func:`boosted_vote`."""
    k = z.shape[0]
    top1 = vote_counts(z)
    has_majority = (top1.max(1).values > k / 2).unsqueeze(1)
    share = torch.where(has_majority, top1, topn_counts(z, n)) / k
    return share + z.softmax(-1).sum(0) / (k * (k + 1))


def auxiliaries(z: torch.Tensor) -> torch.Tensor:
    """The voters of the auxiliary-only configuration (spec §3.2): every member but member 0 (M).

    With M alone (the first stage's monitoring) M is kept, so the rule is defined at every stage.
    """
    return z[1:] if z.shape[0] > 1 else z


def _log_mean_probs(z: torch.Tensor) -> torch.Tensor:
    k = torch.tensor(float(z.shape[0]), device=z.device)
    return torch.logsumexp(z.log_softmax(-1), dim=0) - torch.log(k)


def _register_rules() -> None:
    if "boosted_vote" in combine_names():
        return
    register_combine(CombineRule(
        "log_mean_probs_aux", lambda z: _log_mean_probs(auxiliaries(z)), outputs="log_probs",
        description="log of the auxiliaries' mean softmax probability (member 0 = DKD's M excluded)"))
    register_combine(CombineRule(
        "vote_aux", lambda z: vote_counts(auxiliaries(z)) / auxiliaries(z).shape[0],
        lambda z: majority_vote(auxiliaries(z)), differentiable=False, outputs="votes",
        attack_surrogate="log_mean_probs_aux", vote=VoteInfo(auxiliaries, "majority"),
        description="strict-majority top-1 vote of the members but the first (DKD spec §3.2); "
                    "no majority = wrong"))
    for n in (2, 3):
        suffix = "" if n == 2 else f"_top{n}"
        register_combine(CombineRule(
            f"boosted_vote{suffix}", lambda z, n=n: _boosted_scores(z, n), lambda z, n=n: boosted_vote(z, n),
            differentiable=False, outputs="votes", attack_surrogate="log_mean_probs",
            vote=VoteInfo(all_members, "boosted", n),
            description=f"DKD* boosted vote (DKD spec §3.3): top-1 majority, else top-{n} majority with ties "
                        f"by summed probability, else failed (wrong)"))
        register_combine(CombineRule(
            f"boosted_vote_aux{suffix}", lambda z, n=n: _boosted_scores(auxiliaries(z), n),
            lambda z, n=n: boosted_vote(auxiliaries(z), n), differentiable=False, outputs="votes",
            attack_surrogate="log_mean_probs_aux", vote=VoteInfo(auxiliaries, "boosted", n),
            description=f"DKD* boosted vote (top-{n}) of the members but the first, DKD's auxiliaries "
                        f"(spec §3.2-3.3)"))


_register_rules()


# ------------------------------------------------------------------------------------------ LSS


def hard_margin_svm(pos: np.ndarray, neg: np.ndarray, tol: float = 1e-3) -> dict[str, Any]:
    """Latent Space Separation of two point clouds (spec §6.4, Eq. 5): the margin 2/‖W‖ of the
    hard-margin linear SVM separating ``pos`` (+1) from ``neg`` (−1), on the raw features.

    Separability is decided exactly by a linear program (∃ w, b: y_i (w·x_i + b) ≥ 1); non-separable
    clouds give ``lss = 0`` and ``separable = False`` (spec A18). The max-margin problem
    min ½‖w‖² s.t. y_i (w·x_i + b) ≥ 1 is then solved by SLSQP on a growing working set of
    constraints (the support vectors are few), and the solution is checked against every point.
    """
    from scipy.optimize import linprog, minimize

    x = np.concatenate([pos, neg]).astype(np.float64).reshape(len(pos) + len(neg), -1)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    scale = float(np.abs(x).max()) or 1.0  # the margin of x/s is margin(x)/s; conditioning only
    xs = x / scale
    d = xs.shape[1]
    a = np.hstack([xs, np.ones((len(xs), 1))]) * y[:, None]  # rows: y_i [x_i, 1]
    lp = linprog(np.zeros(d + 1), A_ub=-a, b_ub=-np.ones(len(a)), bounds=[(None, None)] * (d + 1),
                 method="highs")
    if lp.status != 0:
        return {"lss": 0.0, "separable": False, "n_pos": len(pos), "n_neg": len(neg)}
    v = lp.x
    work = np.argsort(a @ v)[: min(len(a), 2 * (d + 1))]
    for _ in range(100):
        aw = a[work]
        res = minimize(lambda u: 0.5 * float(u[:d] @ u[:d]), v,
                       jac=lambda u: np.concatenate([u[:d], [0.0]]),
                       constraints=[{"type": "ineq", "fun": lambda u, aw=aw: aw @ u - 1.0,
                                     "jac": lambda u, aw=aw: aw}],
                       method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
        v = res.x
        slack = a @ v - 1.0
        violated = np.flatnonzero(slack < -1e-9)
        if violated.size == 0:
            break
        add = violated[np.argsort(slack[violated])[: 4 * (d + 1)]]
        work = np.union1d(work, add)
    margins = a @ v
    separable = bool(margins.min() >= 1.0 - tol)
    norm = float(np.linalg.norm(v[:d]))
    lss = 2.0 / norm * scale if separable and norm > 0 else 0.0
    return {"lss": lss, "separable": separable, "n_pos": len(pos), "n_neg": len(neg),
            "support_vectors": int((margins <= 1.0 + 1e-6).sum())}


def latent_space_separation(latents: list[np.ndarray]) -> dict[str, Any]:
    """LSS between every pair of members (Eq. 5) and the ensemble's one-vs-rest LSS (Eq. 6)."""
    k = len(latents)
    pairs = {f"{i}-{j}": hard_margin_svm(latents[i], latents[j]) for i in range(k) for j in range(i + 1, k)}
    one_vs_rest = []
    if k > 1:
        for i in range(k):
            rest = np.concatenate([latents[j] for j in range(k) if j != i])
            one_vs_rest.append(hard_margin_svm(latents[i], rest))
    total = float(np.mean([r["lss"] for r in one_vs_rest])) if one_vs_rest else 0.0
    return {"pairs": pairs, "one_vs_rest": one_vs_rest, "total": total}


# ------------------------------------------------------------------------------------- method


class DKDHyperparameters(Hyperparameters):
    zeta: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="ζ: accuracy/diversity trade-off of Eqs. 3-4, loss (1-ζ)·CE + ζ·mean cosine to the "
                    "frozen predecessors (spec §2.4-2.5); null = the spec's value for the data set (§4): "
                    "0.9 for MNIST (also Fashion-MNIST), 0.5 for CIFAR-10 (also CIFAR-100)")
    latent: list[LatentLayer] = Field(
        default_factory=lambda: ["features"], min_length=1, max_length=2,
        description="layer j of the cosine term (spec §2.3, A1): 'features' = the penultimate "
                    "post-activation vector the classifier reads (default), 'rep' = the same layer before "
                    "its activation; several layers average their cosines")
    abs_cos: bool = Field(
        False, description="ablation of spec A4: penalise |cos| instead of cos (not in the paper; off)")
    include_main_in_vote: bool = Field(
        False, description="whether the main model M (member 0) votes; false = vote over the auxiliaries "
                           "A1..A(K-1) only, the spec's corrected default (§3.2, correction 1)")
    top_n: Literal[2, 3] = Field(
        2, description="n of the boosted vote DKD*: each member's top-n classes vote when top-1 has no "
                       "majority (spec §3.3, A7)")
    objective: Literal["dkd", "kd"] = Field(
        "dkd", description="'dkd' = Eq. 4, push each auxiliary's latent away from its predecessors' (cosine); 'kd' "
                           "= the KD comparator of Table III: pull its softmax towards theirs, (1-ζ)·CE + "
                           "ζ·mean_p T²·KL(softmax(z_p/T) ‖ softmax(z/T)) (spec §2.8, correction 2)")
    kd_temperature: float = Field(
        1.0, gt=0.0, le=100.0,
        description="T of the 'kd' objective (spec §2.8: 1, the paper mentions no temperature; 20 or 100 = "
                    "defensive distillation, correction 2); unused by 'dkd'")
    lss_samples: int = Field(
        2000, ge=0, le=10_000,
        description="test images (head of the report subset) whose latents enter the LSS diagnostic "
                    "(spec §6.4, A18); 0 skips it")

    @field_validator("latent")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("latent layers must not repeat")
        return v


@register_method
class DKD(Method):
    name = "dkd"
    title = "Diverse Knowledge Distillation (DKD)"
    summary = ("Sequential ensemble: M trained with CE, then each auxiliary with (1-ζ)·CE + ζ·cosine "
               "similarity of its latent to every earlier, frozen member's; (boosted) majority vote.")
    spec_file = "specs/dkd.md"
    Hyperparameters = DKDHyperparameters
    default_combine = "boosted_vote_aux"
    min_members = 2
    # M plus three auxiliaries: the deployed vote (over the auxiliaries, spec correction 1) has three voters, as
    # every table of the paper (docs/methods/dkd.md, "Who votes")
    default_members = 4
    find_unused_parameters = False  # one member trains per stage and CE reaches all its parameters

    def __init__(self, hp: Hyperparameters, *, members: int, num_classes: int, dataset: str,
                 architecture: str) -> None:
        super().__init__(hp, members=members, num_classes=num_classes, dataset=dataset,
                         architecture=architecture)
        assert isinstance(hp, DKDHyperparameters)
        self.hp: DKDHyperparameters = hp
        self.zeta: float = hp.zeta if hp.zeta is not None else ZETA_BY_DATASET.get(dataset, 0.9)

    @classmethod
    def constraints(cls, members: int, hp: dict[str, Any]) -> str | None:
        if members < cls.min_members:
            return "members: DKD needs at least 2 members (the main model M and one auxiliary)"
        return None

    def stages(self) -> list[Stage]:
        """One stage per member: stage i trains member i with members 0..i-1 frozen (spec §2.6)."""
        return [Stage("M" if i == 0 else f"A{i}", (i,), tuple(range(i)), train_aux=False)
                for i in range(self.n_members)]

    def latents(self, parts: Any) -> list[torch.Tensor]:
        return [getattr(parts, layer) for layer in self.hp.latent]

    def loss(self, net: TrainNet, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        """Eq. 1 for M, Eq. 3/4 for an auxiliary (spec §2.2-2.5; see :func:`dkd_objective`).

        The frozen predecessors run in eval mode (``TrainNet``) and under ``no_grad``: their latents are
        constants and no gradient reaches them (spec §2.6). Also logs the fraction of samples whose
        student latent is all zeros (the dead-feature monitor of spec §2.7, A4).
        """
        (student,) = net.trainable()
        parts = student.forward_parts(x)
        if self.hp.objective == "kd":
            with torch.no_grad():
                p_logits = [p(x) for p in net.frozen()]
            zeta = self.zeta if p_logits else 0.0
            loss, terms = kd_objective(parts.logits, y, p_logits, zeta, self.hp.kd_temperature)
            named = {k: v for k, v in terms.items() if not k.startswith("kl_")}
            for pos, idx in enumerate(net.stage.frozen_members):
                named[f"kl_{idx}"] = terms[f"kl_{pos}"]
            return LossOutput(loss, named)
        s_lat = self.latents(parts)
        with torch.no_grad():
            p_lat = [self.latents(p.forward_parts(x)) for p in net.frozen()]
        zeta = self.zeta if p_lat else 0.0
        loss, terms = dkd_objective(parts.logits, y, s_lat, p_lat, zeta, self.hp.abs_cos)
        # name the per-predecessor terms by member index
        named = {k: v for k, v in terms.items() if not k.startswith("cos_")}
        for pos, idx in enumerate(net.stage.frozen_members):
            named[f"cos_{idx}"] = terms[f"cos_{pos}"]
        named["dead"] = (s_lat[0].detach().flatten(1).abs().amax(1) == 0).float().mean()
        return LossOutput(loss, named)

    def step_cost(self, stage: Stage) -> dict[str, float]:
        """The student's forward+backward, plus one no-grad forward of each frozen predecessor (issue 13)."""
        cost = {"fwd_bwd": float(len(stage.train_members))}
        if stage.frozen_members:
            cost["fwd"] = float(len(stage.frozen_members))
        return cost

    def combine(self) -> str:
        base = "boosted_vote" if self.hp.include_main_in_vote else "boosted_vote_aux"
        return base if self.hp.top_n == 2 else f"{base}_top{self.hp.top_n}"

    def results(self, net: TrainNet, test: TensorDataset, device: torch.device) -> dict[str, Any]:
        """Resolved settings, clean vote statistics (failed majorities, spec §7.1) for both voter sets,
        pairwise latent cosines, dead-latent fractions and LSS (spec §6.4) on ``test``."""
        out: dict[str, Any] = {
            "zeta": self.zeta, "zeta_source": "hyperparameter" if self.hp.zeta is not None else
            f"spec §4 default for {self.dataset}", "latent": list(self.hp.latent), "abs_cos": self.hp.abs_cos,
            "top_n": self.hp.top_n, "include_main_in_vote": self.hp.include_main_in_vote,
            "deployed_combine": self.combine(), "objective": self.hp.objective,
            "deployed_voters": self.n_members if self.hp.include_main_in_vote else max(self.n_members - 1, 1),
        }
        if self.hp.objective == "kd":
            out["kd_temperature"] = self.hp.kd_temperature
        out.update(ensemble_diagnostics(list(net.members), test, device, self.hp.latent, self.hp.top_n,
                                        self.hp.lss_samples, self.hp.abs_cos))
        return out


@torch.no_grad()
def ensemble_diagnostics(members: list[torch.nn.Module], test: TensorDataset, device: torch.device | str,
                         latent: list[str] | tuple[str, ...] = ("features",), top_n: int = 2,
                         lss_samples: int = 2000, abs_cos: bool = False) -> dict[str, Any]:
    """DKD's diagnostics for any ensemble of ``MemberNet`` members (DKD or a baseline, for comparison):
    vote statistics of all members and of the members but the first (spec §3.3, §7.1), the mean cosine
    between every pair of members' latents, the fraction of all-zero latents (spec A4), and LSS between
    every pair and one-vs-rest (spec §6.4) on the first ``lss_samples`` images of ``test``."""
    for m in members:
        m.eval()
    logits: list[torch.Tensor] = []
    lat: list[list[torch.Tensor]] = [[] for _ in latent]
    labels: list[torch.Tensor] = []
    for xb, yb in iterate_eval(test, 500, device):
        parts = [m.forward_parts(xb) for m in members]
        logits.append(torch.stack([p.logits for p in parts]))
        for li, layer in enumerate(latent):
            lat[li].append(torch.stack([getattr(p, layer).flatten(1) for p in parts]))
        labels.append(yb)
    z = torch.cat(logits, 1).cpu()
    y = torch.cat(labels).cpu()
    latents = [torch.cat(chunks, 1).cpu() for chunks in lat]  # per layer: (K, N, d)
    out: dict[str, Any] = {"n": int(y.shape[0]), "vote": {"all_members": vote_statistics(z, y, top_n)}}
    if z.shape[0] > 1:
        out["vote"]["auxiliaries"] = vote_statistics(z[1:], y, top_n)
    k = z.shape[0]
    first = latents[0]
    out["latent_cosine"] = [[float(latent_cosine(first[i], first[j], abs_cos).mean()) for j in range(k)]
                            for i in range(k)]
    out["dead_latent_fraction"] = [float((first[i].abs().amax(1) == 0).float().mean()) for i in range(k)]
    if lss_samples:
        n = min(lss_samples, first.shape[1])
        out["lss"] = {layer: {"n_samples": n, **latent_space_separation(
            [latents[li][i, :n].double().numpy() for i in range(k)])} for li, layer in enumerate(latent)}
    return out


def vote_statistics(z: torch.Tensor, y: torch.Tensor, top_n: int = 2) -> dict[str, Any]:
    """Accuracy and failed majorities of the regular and the boosted vote, and the soft-average accuracy
    (spec §3.3, §6.2, §7.1) for voters ``z`` ``(K, N, C)`` and labels ``y``; failures count as wrong."""
    regular = majority_vote(z)
    boosted = boosted_vote(z, top_n)
    soft = z.softmax(-1).mean(0).argmax(1)
    n = max(int(y.shape[0]), 1)
    return {
        "voters": int(z.shape[0]),
        "majority_acc": float((regular == y).sum()) / n,
        "failed_majorities": int((regular < 0).sum()),
        "boosted_acc": float((boosted == y).sum()) / n,
        "boosted_failed_majorities": int((boosted < 0).sum()),
        "soft_average_acc": float((soft == y).sum()) / n,
        "member_acc": [float((z[i].argmax(1) == y).sum()) / n for i in range(z.shape[0])],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m ensemble_core.methods.dkd CHECKPOINT...``: DKD's diagnostics (votes, failed majorities,
    latent cosines, LSS) for trained ensembles on the PROTOCOL report subset, as JSON. With
    ``--transfer-from SURROGATE``, also the vote statistics under FGSM examples crafted on that ensemble
    (cross-entropy on its attack target, fixed budget ε, the spec §6.1 ``fixed_budget`` mode): the analogue
    of the paper's Tables II-III for FGSM."""
    import argparse
    import json

    from ensemble_core.attacks import ce_loss_fn, pgd_linf
    from ensemble_core.checkpoint import checkpoint_spec, load_checkpoint, load_ensemble
    from ensemble_core.data import load_dataset, test_subset

    p = argparse.ArgumentParser(prog="python -m ensemble_core.methods.dkd", description=main.__doc__)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--n", type=int, default=2000, help="head of the report subset (default 2000)")
    p.add_argument("--latent", default="features", choices=["features", "rep"])
    p.add_argument("--transfer-from", help="surrogate ensemble checkpoint for transfer FGSM")
    p.add_argument("--fgsm-eps", type=float, nargs="+", default=[0.1, 0.2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    specs = {path: checkpoint_spec(load_checkpoint(path)) for path in args.checkpoints}
    first = next(iter(specs.values()))
    test = test_subset(load_dataset(first["dataset"], "test", first.get("data_dir")), "report", n=args.n)
    adv: dict[float, torch.Tensor] = {}
    if args.transfer_from:
        target = load_ensemble(args.transfer_from).attack_target()
        x, y = test.as_float()
        for eps in args.fgsm_eps:
            adv[eps] = torch.cat([pgd_linf(ce_loss_fn(target, y[i:i + 500]), x[i:i + 500], eps, eps, 1)
                                  for i in range(0, len(y), 500)])
    report: dict[str, Any] = {"n": len(test), "subset": "report, head", "transfer_from": args.transfer_from}
    for path, spec in specs.items():
        ens = load_ensemble(path)
        d = ensemble_diagnostics(list(ens.members), test, "cpu", [args.latent], 2, args.n)
        entry = {"method": spec["method"], "members": len(ens), "combine": ens.combine, **d}
        for eps, xa in adv.items():
            z = torch.cat([ens.member_logits(xa[i:i + 500]) for i in range(0, len(xa), 500)], 1)
            y = test.labels
            entry.setdefault("transfer_fgsm", {})[str(eps)] = {
                "all_members": vote_statistics(z, y), "auxiliaries": vote_statistics(z[1:], y),
                "deployed_acc": float((ens.rule.predict_labels(z) == y).float().mean())}
        report[path] = entry
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
