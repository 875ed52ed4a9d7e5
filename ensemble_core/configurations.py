"""Named configurations: the papers' variants of our method plug-ins, and the papers' training recipes.

A *configuration* is a method plus the hyperparameters (and member count) that make it one published
row; a *recipe* is the training budget and data handling of one paper's reference code. Neither is a
copy of a trainer: each only sets documented hyperparameters of the existing plug-ins
(``ensemble_core/methods``) and fields of :class:`ensemble_core.spec.TrainSpec`. Where our default
differs from a paper's variant, the variant is here under its own name and the method page
(``docs/methods/<method>.md``, "Configurations") says which we keep as the default and why.

    from ensemble_core.configurations import train_spec
    spec = train_spec("gal-lsd", recipe="lsd-mnist", seed=0)   # a TrainSpec dict

Sources: ``shared/specs/cldl.md`` §3 (the LSD reference code's optimiser, passes and loader), §6.3
(its ADP, GAL, DVERGE and TRS), A12 (flip); ``shared/specs/dkd.md`` §2.8, §3.1 (DKD's recipe, RI and
KD); the LSD code itself (``ZJLAB-AMMI/LSD`` ``aa0f3eb``: ``train/trainer.py``, ``models/lenet.py``,
``utils/utils_models.py``), read to learn, not copied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Configuration:
    """A method with the hyperparameters of one published variant."""

    name: str
    method: str
    title: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    members: int = 3
    combine: str | None = None
    source: str = ""
    differs: tuple[str, ...] = ()  # what differs from the method's defaults, one plain sentence each
    architecture: str | None = None  # overrides the recipe's (e.g. DKD's surrogate LeNet)


@dataclass(frozen=True)
class Recipe:
    """Train-spec fields of one reference training setup (budget, optimiser, schedule, data handling)."""

    name: str
    title: str
    fields: dict[str, Any]
    source: str = ""


LSD = "the LSD reference code (ZJLAB-AMMI/LSD aa0f3eb), which produced CLDL's Tables IV-XI"

CONFIGURATIONS: dict[str, Configuration] = {c.name: c for c in [
    Configuration("baseline", "baseline", "Baseline: members trained independently with cross-entropy",
                  source="spec cldl §6.1 (the LSD code's Baseline_Trainer: per-member Adam = our summed CE)"),
    Configuration("baseline-5", "baseline", "Baseline, 5 members (transfer surrogate)", members=5,
                  source="PROTOCOL.md, spec cldl §6.1"),
    Configuration("adp-lsd", "adp", "ADP as in the LSD code (CLDL Table IV)",
                  {"alpha": 2.0, "beta": 0.5, "det_offset": 1e-6, "ce_reduction": "sum"},
                  source=f"spec cldl §6.3; {LSD}: ADP_Trainer",
                  differs=("none in the loss: our defaults are the LSD values (α 2, β 0.5, δ 1e-6, summed CE); "
                           "only the recipe differs",)),
    Configuration("gal-lsd", "gal", "GAL as in the LSD code (CLDL Table IV)",
                  {"lam": 0.5, "ce_reduction": "mean", "cos_eps": 1e-8},
                  source=f"spec cldl §6.3; {LSD}: GAL_Trainer",
                  differs=("the members' CEs are averaged (ours: summed), so the coherence term weighs N = 3 "
                           "times more against the CE",
                           "cosines as torch 1.9's F.cosine_similarity(eps=1e-8) on batch-mean-CE gradients: "
                           "denominator max(‖g_i‖‖g_j‖, 1e-8·B²) (ours: exact)")),
    Configuration("trs-lsd", "trs", "TRS as in the LSD code (CLDL Table IV)",
                  {"lambda_a": 10.0, "lambda_b": 10.0, "smooth_norm": "squared", "grad_scale": "batch_mean",
                   "smooth_points": "clean", "ce_reduction": "mean", "cos_eps": 1e-8},
                  source=f"spec cldl §6.3; {LSD}: TRS_Trainer (scale 5, coeff 2, lamda 2, no --plus-adv)",
                  differs=("the members' CEs are averaged (ours: summed)",
                           "the smoothness term is taken at the clean points (ours: half the batch at "
                           "6-step PGD points, the TRS code's --plus-adv), so no PGD is run",
                           "cosines as torch 1.9's F.cosine_similarity(eps=1e-8) on batch-mean-CE gradients")),
    Configuration("dverge-lsd", "dverge", "DVERGE as in the LSD code (CLDL Table IV)",
                  {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "momentum": 1.0, "random_start": False,
                   "features": "post_relu", "start_from": "scratch"},
                  source=f"spec cldl §6.3; {LSD}: DVERGE_Trainer, LeNet.get_features",
                  differs=("the distillation matches post-ReLU features (the LSD LeNet's get_features applies "
                           "F.relu after conv1, conv2, fc1 and the 64-d layer; ours: the raw, pre-ReLU "
                           "outputs, as DVERGE's own code for its ResNets)",)),
    Configuration("cldl-3-4-4", "cldl", "CLDL(3,4,4): γ 3, α 4, β 4 (MNIST headline)",
                  {"gamma": 3.0, "alpha": 4.0, "beta": 4.0}, source="spec cldl §4, Table IV"),
    Configuration("cldl-3-2-1", "cldl", "CLDL(3,2,1): γ 3, α 2, β 1 (MNIST second column)",
                  {"gamma": 3.0, "alpha": 2.0, "beta": 1.0}, source="spec cldl §4, Table IV"),
    Configuration("cldl-3-4-4-lsd", "cldl", "CLDL(3,4,4) with the LSD code's cosine (torch 1.9)",
                  {"gamma": 3.0, "alpha": 4.0, "beta": 4.0, "cos_eps": 1e-8},
                  source=f"spec cldl §2.5, Table IV; {LSD}: LCM_GAL_Trainer (F.cosine_similarity on the "
                         "gradients of the batch-mean KL, PyTorch 1.9)",
                  differs=("ℓ_gd's cosines as torch 1.9's F.cosine_similarity(eps=1e-8) on batch-mean-KL "
                           "gradients: denominator max(‖g_i‖‖g_j‖, 1e-8·B²) (ours: exact), as gal-lsd and trs-lsd "
                           "already do",)),
    Configuration("cldl-3-2-1-lsd", "cldl", "CLDL(3,2,1) with the LSD code's cosine (torch 1.9)",
                  {"gamma": 3.0, "alpha": 2.0, "beta": 1.0, "cos_eps": 1e-8},
                  source=f"spec cldl §2.5, Table IV; {LSD}: LCM_GAL_Trainer",
                  differs=("ℓ_gd's cosines as torch 1.9's F.cosine_similarity(eps=1e-8) on batch-mean-KL "
                           "gradients (ours: exact)",)),
    Configuration("cldl-3-0-0", "cldl", "CLDL(3,0,0): the label confusion model alone (ablation)",
                  {"gamma": 3.0, "alpha": 0.0, "beta": 0.0}, source="spec cldl Table VI"),
    Configuration("cldl-3-2-4", "cldl", "CLDL(3,2,4): γ 3, α 2, β 4 (Fashion-MNIST headline)",
                  {"gamma": 3.0, "alpha": 2.0, "beta": 4.0}, source="spec cldl §4, Table VIII"),
    # ---- DKD, Table III (spec dkd §2.8, §3.1-3.3): 3 voters in every table
    Configuration("dkd-3voters", "dkd", "DKD*: M and three auxiliaries, the auxiliaries' boosted vote",
                  {"include_main_in_vote": False, "top_n": 2}, members=4,
                  source="spec dkd §3.1-3.3, correction 1 (vote over the auxiliaries, three voters as in "
                         "every table)"),
    Configuration("dkd-mvote", "dkd", "DKD*: M and two auxiliaries, all three vote",
                  {"include_main_in_vote": True, "top_n": 2}, members=3,
                  source="spec dkd §3.2 (the other reading: M votes)"),
    Configuration("kd-3voters", "dkd", "KD*: sequential knowledge distillation (Table III's KD), three voters",
                  {"objective": "kd", "kd_temperature": 1.0, "include_main_in_vote": False, "top_n": 2},
                  members=4, source="spec dkd §2.8 (KD formula recommended there, T = 1), correction 2"),
    Configuration("ri-3", "baseline", "RI*: three independently initialised members, boosted vote",
                  members=3, combine="boosted_vote", source="spec dkd §2.8 (RI), §3.3 (boosted vote)"),
    Configuration("lenet-surrogate", "baseline", "DKD's black-box surrogate: one LeCun LeNet-5",
                  members=1, architecture="lenet5_classic", source="spec dkd §5.2"),
]}

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("lsd-mnist", "The LSD code's MNIST recipe: 20 + 1 passes, batch 128 (last batch kept), Adam 1e-3 "
                        "(ε 1e-7), weight decay 1e-4, no decay, horizontal flip",
           {"dataset": "mnist", "architecture": "lenet5", "epochs": 20, "extra_pass": True, "batch_size": 128,
            "drop_last": False, "hflip": True, "augment": False, "val_size": 0,
            "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4, "eps": 1e-7},
            "schedule": {"name": "constant"}},
           source="spec cldl §3 (range(0, epochs + 1), Adam eps 1e-7, milestones [100, 150] never reached), A12 "
                  "(RandomCrop(28) = no crop, RandomHorizontalFlip), §5 (full 60k); LSD utils_models.get_loaders "
                  "(DataLoader keeps the last partial batch)"),
    Recipe("lsd-fashion", "The LSD code's Fashion-MNIST recipe: 30 + 1 passes, lr x0.1 at 10 and 20, otherwise "
                          "as lsd-mnist",
           {"dataset": "fashion_mnist", "architecture": "lenet5", "epochs": 30, "extra_pass": True,
            "batch_size": 128, "drop_last": False, "hflip": True, "augment": False, "val_size": 0,
            "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4, "eps": 1e-7},
            "schedule": {"name": "multistep", "milestones": [10, 20], "gamma": 0.1}},
           source="spec cldl §3, A11, A12"),
    Recipe("dkd-mnist", "DKD's MNIST recipe: Table I network, 100 epochs per member, batch 64, Adam 1e-4",
           {"dataset": "mnist", "architecture": "dkd_mnist", "epochs": 100, "batch_size": 64, "val_size": 0,
            "optimizer": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0},
            "schedule": {"name": "constant"}},
           source="spec dkd §3.1, §4 (Table I: EPOCH 100, batch 64, Adam 1e-4), §5.1"),
]}


def configuration(name: str) -> Configuration:
    if name not in CONFIGURATIONS:
        raise ValueError(f"unknown configuration {name!r}; expected one of {', '.join(sorted(CONFIGURATIONS))}")
    return CONFIGURATIONS[name]


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def train_spec(config: str, *, recipe_name: str, seed: int, overrides: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """The declared (unresolved) train spec of ``config`` under ``recipe_name`` with training seed ``seed``.

    ``overrides`` (e.g. a smaller budget for a smoke test) replace recipe fields last. The result is a plain
    dict that :class:`ensemble_core.spec.TrainSpec` validates; its keys are what a campaign's unit key hashes.
    """
    c, r = configuration(config), recipe(recipe_name)
    spec: dict[str, Any] = copy.deepcopy(r.fields)
    spec.update(method=c.method, members=c.members, seed=seed, hyperparameters=copy.deepcopy(c.hyperparameters))
    if c.architecture is not None:
        spec["architecture"] = c.architecture
    if c.combine is not None:
        spec["combine"] = c.combine
    for k, v in (overrides or {}).items():
        spec[k] = copy.deepcopy(v)
    return spec


__all__ = ["CONFIGURATIONS", "RECIPES", "Configuration", "Recipe", "configuration", "recipe", "train_spec"]
