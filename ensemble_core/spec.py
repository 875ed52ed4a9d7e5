"""Job specifications: the one contract between the REST API, the queue, the workers and the library.

This module imports pydantic only (never torch), so the API can validate requests without loading
torch at start-up. Method hyperparameters are validated by the chosen method's own schema, which
is resolved lazily through :func:`ensemble_core.methods.hyperparameter_model` on first use.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic")
DATASET_ALIASES = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar-10": "cifar10",
                   "cifar-100": "cifar100"}

# Bounds so that one request cannot ask for unbounded work (reliability issue).
MAX_MEMBERS = 16
MAX_EPOCHS = 1000
MAX_BATCH = 8192
MAX_WORKERS = 64
MAX_EXAMPLES = 1_000_000  # train_subset: larger than every supported training split
MAX_TRIALS = 1024  # a search's trials: num_samples x the grid's combinations
MAX_SEARCH_KEYS = 32
MAX_OBJECTIVES = 4  # metrics of a multi-objective search
MAX_SEARCH_VALUES = 256
SEARCH_BOUND = 1e12  # |low|, |high| of a search domain


class StrictModel(BaseModel):
    """Base for every spec: unknown keys are errors, so a typo is reported by name (HTTP 422)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerSpec(StrictModel):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    nesterov: bool = False
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, le=1e-2, description="Adam only: ε of the denominator (torch's default 1e-8; the "
                                                           "CLDL reference code uses 1e-7, spec cldl §3)")


class ScheduleSpec(StrictModel):
    name: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: list[Annotated[int, Field(ge=1, le=MAX_EPOCHS)]] = Field(default_factory=list, max_length=64,
                                                                         description="epochs (multistep)")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep factor")
    warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if v != sorted(v):
            raise ValueError("milestones must be increasing")
        return v


class TrainSpec(StrictModel):
    """Everything that configures one ensemble training run (resolved form stored with every job)."""

    method: str = Field("baseline", description="a registered method name (GET /v1/methods)")
    dataset: str = Field("mnist", description=f"one of {', '.join(DATASETS)}")
    data_dir: str | None = Field(
        None, description="directory of the dataset files (CIFAR, or a non-default Fashion-MNIST)")
    architecture: str = Field("lenet5", description="a registered architecture name")
    members: int = Field(3, ge=1, le=MAX_MEMBERS, description="ensemble members; when omitted, the method's default "
                                                               "(3; DKD 4: M plus three voting auxiliaries)")
    epochs: int = Field(2, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="global batch, split across workers")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                            description="validated by the method's schema; defaults filled in")
    train_subset: int | None = Field(None, ge=1, le=MAX_EXAMPLES, description="train on a seeded subset of this size")
    val_size: int = Field(0, ge=0, le=50_000, description="held out from the training split for validation")
    augment: bool | None = Field(None, description="crop+flip augmentation; default: on for CIFAR, off for MNIST")
    hflip: bool | None = Field(
        None, description="random horizontal flip (p = 1/2) of training images; default: with augment, on 3-channel "
                          "data only; true also flips 1-channel data (no crop unless augment), as the CLDL reference "
                          "code does on MNIST and Fashion-MNIST (spec cldl A12)")
    drop_last: bool = Field(
        True, description="drop each epoch's last incomplete batch (equal DDP shares); false keeps it, as the CLDL "
                          "reference code's DataLoader does (one worker only)")
    extra_pass: bool = Field(
        False, description="train epochs + 1 passes, as the CLDL reference code's `range(0, epochs + 1)` (spec cldl "
                           "§3); the extra pass is epoch number epochs + 1 of the schedule")
    combine: str | None = Field(None, description="inference rule; default: the method's")
    eval_subset: int = Field(2000, ge=0, le=10_000, description="test images scored for clean accuracy at the end")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data_seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="seed of the data side alone (validation split, batch order, augmentation, each step's random "
                    "draws); default: seed. Members are always initialised from seed, so two specs that differ only "
                    "here start from the same weights and see different data")
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    deterministic: bool = False

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = DATASET_ALIASES.get(v.lower(), v.lower())
            if v not in DATASETS:
                raise ValueError(f"unknown dataset {v!r}; expected one of {', '.join(DATASETS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_members(cls, data: Any) -> Any:
        """A spec that gives no ``members`` gets its method's ``default_members``."""
        if isinstance(data, dict) and data.get("members") is None and isinstance(data.get("method"), str):
            from ensemble_core.methods import get_method, method_names

            if data["method"] in method_names():
                data = {**data, "members": get_method(data["method"]).default_members}
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from ensemble_core.methods import method_names

        if v not in method_names():
            raise ValueError(f"unknown method {v!r}; expected one of {', '.join(method_names())}")
        return v

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: str) -> str:
        from ensemble_core.registry_names import architecture_names

        if v not in architecture_names():
            raise ValueError(f"unknown architecture {v!r}; expected one of {', '.join(architecture_names())}")
        return v

    @field_validator("combine")
    @classmethod
    def _combine(cls, v: str | None) -> str | None:
        from ensemble_core.registry_names import combine_names

        if v is not None and v not in combine_names():
            raise ValueError(f"unknown combine rule {v!r}; expected one of {', '.join(combine_names())}")
        return v

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # the method itself failed validation; its error is reported
            return v
        from ensemble_core.methods import hyperparameter_model

        model = hyperparameter_model(method)
        # Errors raised here carry their own locations (e.g. hyperparameters.zeta). The context lets a
        # method fill data-set-dependent defaults into the resolved spec (e.g. CLDL's γ, α).
        context = {"dataset": info.data.get("dataset"), "architecture": info.data.get("architecture"),
                   "epochs": info.data.get("epochs")}
        return model.model_validate(v, context=context).model_dump(mode="json")

    @model_validator(mode="after")
    def _check_members(self) -> TrainSpec:
        from ensemble_core.methods import method_constraints

        problem = method_constraints(self.method, self.members, self.hyperparameters)
        if problem:
            raise ValueError(problem)
        if self.schedule.milestones and self.schedule.milestones[-1] > self.epochs:
            raise ValueError("schedule.milestones must not exceed epochs")
        if not self.drop_last and self.workers > 1:
            raise ValueError("drop_last: keeping the last incomplete batch needs workers = 1 (equal DDP shares)")
        return self

    @property
    def data_order_seed(self) -> int:
        """The seed of the data side: ``data_seed``, or ``seed`` when unset."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def passes(self) -> int:
        """Passes over the training set per stage: ``epochs``, plus one with ``extra_pass``."""
        return self.epochs + int(self.extra_pass)

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in, as stored with a job and its checkpoints."""
        return self.model_dump(mode="json")


ATTACK_NAMES = ("fgsm", "bim", "mim", "pgd", "pgdl2", "cw", "square", "mora", "autoattack", "autoattack_port")
LOSS_NAMES = ("ce", "cw", "dlr", "vote", "softvote")
# Which losses each attack takes (docs/evaluation.md): the iterative attacks take every loss, including the
# vote-aware ones; the ensemble-aware attack takes per-member losses; Square takes CE or its margin loss.
ATTACK_LOSSES: dict[str, tuple[str, ...]] = {
    "fgsm": LOSS_NAMES, "bim": LOSS_NAMES, "mim": LOSS_NAMES, "pgd": LOSS_NAMES, "pgdl2": LOSS_NAMES,
    "mora": ("ce", "cw", "dlr"), "square": ("ce", "cw"), "cw": ("ce", "cw"), "autoattack": ("ce", "cw"),
    "autoattack_port": ("ce", "cw")}

LossName = Literal["ce", "cw", "dlr", "vote", "softvote"]


class AttackSpec(StrictModel):
    """One attack of an evaluation; every parameter is recorded in the results (docs/evaluation.md)."""

    name: Literal["fgsm", "bim", "mim", "pgd", "pgdl2", "cw", "square", "mora", "autoattack",
                  "autoattack_port"] = Field(
        "pgd", description="fgsm, bim, mim, pgd, pgdl2 (our loops, every iterate scored on the deployed rule); cw "
                           "(L2 minimal perturbation); square (gradient-free); mora (ensemble-aware, member "
                           "reweighing); autoattack (the reference AutoAttack, PyPI pyautoattack); autoattack_port "
                           "(torchattacks' port, for comparison only)")
    eps: list[Annotated[float, Field(ge=0, le=64)]] = Field(default_factory=lambda: [0.1, 0.2, 0.3])
    steps: int = Field(40, ge=1, le=10_000)
    alpha: float | None = Field(None, gt=0, le=64, description="step size; default eps/4 (pgd) or eps/steps")
    alpha_ratio: float | None = Field(None, gt=0, le=10,
                                      description="step size as a multiple of each eps (0.2 = eps/5); overrides alpha")
    restarts: int = Field(1, ge=1, le=100)
    loss: LossName = Field("ce", description="ce, cw (margin), dlr, vote (vote-aware hinge), softvote "
                                             "(low-temperature soft vote)")
    kappa: float = Field(0.0, ge=0, le=100, description="CW margin confidence; vote-hinge overshoot")
    momentum: float = Field(1.0, ge=0, le=10, description="MIM decay")
    c: float = Field(1.0, gt=0, le=1e4, description="CW-L2 constant")
    lr: float = Field(0.01, gt=0, le=10, description="CW-L2 learning rate")
    n_queries: int = Field(1000, ge=1, le=100_000, description="Square attack queries")
    random_start: bool = True
    norm: Literal["Linf", "L2"] | None = Field(
        None, description="threat model of square / mora / autoattack (default Linf); the other attacks' norm is "
                          "fixed")
    losses: list[LossName] | None = Field(
        None, min_length=1, max_length=5,
        description="several losses: per-example worst case over all of them (overrides loss)")
    version: Literal["standard", "plus", "rand"] = Field("standard", description="AutoAttack version")
    mora_mode: Literal["auto", "logits", "softmax", "vote"] = Field(
        "auto", description="ensemble pattern of the ensemble-aware attack; auto = from the deployed rule")
    vote_temperature: float = Field(0.25, gt=0, le=100, description="temperature of the softvote loss")
    label: str | None = Field(None, min_length=1, max_length=64,
                              description="name shown in tables (default: derived from name, loss and steps)")

    @model_validator(mode="after")
    def _norm(self) -> AttackSpec:
        fixed = {"fgsm": "Linf", "bim": "Linf", "mim": "Linf", "pgd": "Linf", "pgdl2": "L2", "cw": "L2"}
        if self.norm is not None and self.name in fixed and self.norm != fixed[self.name]:
            raise ValueError(f"norm: {self.name} is an {fixed[self.name]} attack (use pgd / pgdl2 for the other norm)")
        allowed = ATTACK_LOSSES[self.name]
        for field_name, values in (("losses", self.losses or []), ("loss", [self.loss])):
            bad = [v for v in values if v not in allowed]
            if bad and not (field_name == "loss" and self.losses):
                raise ValueError(f"{field_name}: {self.name} does not take the loss {bad[0]!r}; it takes "
                                 f"{', '.join(allowed)}")
        return self

    @field_validator("eps")
    @classmethod
    def _nonempty(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("eps needs at least one value")
        if len(v) > 32:
            raise ValueError("at most 32 eps values")
        return v


class MemberTransferSpec(StrictModel):
    """Member-to-member transferability: PGD on member i alone, scored on member j."""

    eps: float | None = Field(None, gt=0, le=64, description="L∞ eps; default the middle eps of the first L∞ attack")
    steps: int = Field(10, ge=1, le=10_000)
    alpha: float | None = Field(None, gt=0, le=64, description="step size; default eps/5")


class EvalChecksSpec(StrictModel):
    """The automatic sanity checks (flags) run with every evaluation."""

    large_eps: float | None = Field(0.5, gt=0, le=64, description="L∞ eps at which accuracy must reach chance; "
                                    "null disables (0.5 lets every image become the same grey image)")
    large_eps_l2: float | None = Field(None, gt=0, le=1e4, description="L2 counterpart; default 0.5·sqrt(pixels)")
    large_eps_steps: int = Field(20, ge=1, le=10_000)
    n_examples: int = Field(100, ge=1, le=10_000, description="examples used by the large-eps and PGD-k/2k checks")
    convergence: bool = Field(True, description="PGD-k vs PGD-2k at every eps of the first PGD attack (its breaks "
                                                "enter the worst case)")
    collapse_gap: float = Field(0.2, ge=0, le=1, description="member_collapse fires when a member's clean accuracy "
                                                             "is more than this below the best member's")
    tolerance: float = Field(0.02, ge=0, le=1, description="accuracy difference that raises a comparison flag")


class EvaluateSpec(StrictModel):
    """An evaluation of a trained ensemble (a train job's id, a registered model's id or a checkpoint path)."""

    target_job: str | None = Field(None, description="id of the train job whose ensemble is attacked")
    target_checkpoint: str | None = Field(None, description="path of an ensemble checkpoint (local use)")
    n_examples: int = Field(1000, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    split: Literal["report", "selection", "full"] = Field(
        "report", description="the PROTOCOL's test subsets: report = idx[1000:], selection = idx[:1000]")
    attacks: list[AttackSpec] = Field(default_factory=lambda: [AttackSpec()], max_length=32)
    transfer_from_job: str | None = Field(None, description="surrogate train job: black-box transfer attacks")
    transfer_from_checkpoint: str | None = None
    baseline_job: str | None = Field(None, description="a second ensemble evaluated alike, for comparison")
    baseline_checkpoint: str | None = None
    target_model: str | None = Field(None, description="id of a registered model (POST /v1/models) to attack")
    transfer_from_model: str | None = Field(None, description="a registered model as the transfer surrogate")
    baseline_model: str | None = Field(None, description="a registered model evaluated alike, for comparison")
    combine: str | None = Field(None, description="override the deployed inference rule")
    batch_size: int = Field(250, ge=1, le=MAX_BATCH)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    use_gpu: bool = False
    transfer_attacks: list[AttackSpec] = Field(
        default_factory=list, max_length=32,
        description="attacks crafted on the surrogate and applied to the target (black-box transfer); empty with a "
                    "surrogate = PROTOCOL.md's set (FGSM, BIM, MIM, PGD; CE and CW κ=0.1) at the data set's eps")
    transfer_n_examples: int | None = Field(
        None, ge=1, le=10_000, description="seeded slice for the transfer attacks (default n_examples); the smaller "
                                           "of the two slices is contained in the larger")
    member_transfer: MemberTransferSpec | None = Field(
        default_factory=MemberTransferSpec, description="member-to-member transferability matrix; null disables")
    checks: EvalChecksSpec = Field(default_factory=EvalChecksSpec)
    among_correct: bool = Field(
        True, description="also report robust accuracy among the initially correct examples (labelled as such)")

    @model_validator(mode="after")
    def _target(self) -> EvaluateSpec:
        if sum(v is not None for v in (self.target_job, self.target_checkpoint, self.target_model)) != 1:
            raise ValueError("exactly one of target_job, target_checkpoint and target_model is required")
        for role in ("transfer_from", "baseline"):
            if getattr(self, f"{role}_model") is not None and (
                    getattr(self, f"{role}_job") is not None or getattr(self, f"{role}_checkpoint") is not None):
                raise ValueError(f"{role}_model: give one of {role}_job, {role}_checkpoint and {role}_model")
        return self

    @field_validator("transfer_attacks")
    @classmethod
    def _transfer_losses(cls, v: list[AttackSpec]) -> list[AttackSpec]:
        for a in v:
            if {"vote", "softvote"} & set(a.losses or [a.loss]):
                raise ValueError("vote-aware losses attack the target's own vote; transfer examples are crafted on "
                                 "the surrogate's log of mean probabilities: use ce, cw or dlr")
        return v

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SearchDomain(StrictModel):
    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = Field(None, max_length=MAX_SEARCH_VALUES)
    low: float | None = Field(None, ge=-SEARCH_BOUND, le=SEARCH_BOUND, allow_inf_nan=False)
    high: float | None = Field(None, ge=-SEARCH_BOUND, le=SEARCH_BOUND, allow_inf_nan=False)

    @model_validator(mode="after")
    def _shape(self) -> SearchDomain:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.type} needs low < high")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        return self


# Training-split sizes, to check a search's held-out validation size before any trial starts.
TRAIN_SPLIT_SIZES = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000,
                     "synthetic": 2048}
TUNE_LR_KEYS = ("lr", "optimizer.lr")
TUNE_METRICS = ("val_clean_acc", "val_robust_acc", "objective")  # and any train_* loss term


def tune_target(key: str) -> tuple[str, str]:
    """Where a search-space key goes in a train spec: ("optimizer", "lr") or ("hyperparameters", name)."""
    if key in TUNE_LR_KEYS:
        return "optimizer", "lr"
    return "hyperparameters", key.removeprefix("hyperparameters.")


def apply_tune_config(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The train spec of one trial: ``base`` with each searched value put in its place."""
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in config.items():
        section, name = tune_target(key)
        spec[section] = {**(spec.get(section) or {}), name: value}
    return spec


def _tune_metric_problem(name: str) -> str | None:
    if name in TUNE_METRICS or name.startswith("train_"):
        return None
    if name.startswith(("sel_", "test_")):
        return (f"{name!r} is measured on the test split; a search may only select on the held-out "
                f"validation split: use one of {', '.join(TUNE_METRICS)} or a train_* loss")
    return f"unknown metric {name!r}; expected one of {', '.join(TUNE_METRICS)} or a train_* loss"


class RobustMetricSpec(StrictModel):
    """The cheap fixed attack a search may select on: PGD on a fixed validation subset, every epoch."""

    eps: float | None = Field(None, gt=0, le=1, description="L∞ budget in [0, 1] pixels; default by data "
                                                             "set: MNIST 0.2, Fashion-MNIST 0.1, CIFAR 8/255")
    steps: int = Field(10, ge=1, le=100, description="PGD steps of size eps/4, from a seeded random start")
    n_examples: int = Field(500, ge=1, le=10_000, description="the first n images of the validation split")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the random start")


class TuneSpec(StrictModel):
    """A Ray Tune search over a method's hyperparameters (and the optimiser's lr).

    ``search_space`` keys are the method's hyperparameter names (as in ``GET /v1/methods``; also
    accepted as ``hyperparameters.<name>``) and ``lr`` (or ``optimizer.lr``). Every trial trains
    ``base`` with the sampled values on ``val_size`` held-out training images and reports ``metric``
    once per epoch (so ASHA can stop it early); the test split is never used to select.
    """

    base: dict[str, Any] = Field(description="a train spec; searched keys override it")
    search_space: dict[str, SearchDomain] = Field(max_length=MAX_SEARCH_KEYS)
    num_samples: int = Field(4, ge=1, le=256)
    scheduler: Literal["asha", "pbt", "fifo"] = Field(
        "asha", description="asha: early stopping; pbt: population-based training (not with optuna); fifo: "
                "every trial runs to the end (the default, and the only choice, with 'metrics')")
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random", description="random sampling, the grid of choice/grid values, or Optuna's TPE sampler "
                              "(seeded with 'seed'; needs the optuna package on the workers)")
    metric: str = Field("val_clean_acc", description="the metric that selects the best trial (with "
                                                     "'metrics': one of them, by default the first)")
    mode: Literal["max", "min"] = "max"
    metrics: list[str] | None = Field(
        None, min_length=2, max_length=MAX_OBJECTIVES,
        description="multi-objective search (search_alg 'optuna', scheduler 'fifo'): the metrics Optuna "
                    "optimises together, e.g. ['val_clean_acc', 'val_robust_acc']; the result has their "
                    "Pareto front")
    modes: list[Literal["max", "min"]] | None = Field(
        None, min_length=2, max_length=MAX_OBJECTIVES,
        description="'max' or 'min' for each of 'metrics' (default: 'max' for each)")
    max_concurrent_trials: int = Field(2, ge=1, le=64)
    grace_period: int = Field(1, ge=1, le=1000)
    reduction_factor: int = Field(2, ge=2, le=16)
    cpus_per_trial: float = Field(1.0, gt=0, le=64)
    gpus_per_trial: float = Field(0.0, ge=0, le=8)
    val_size: int = Field(5000, ge=1, le=50_000, description="training images held out in every trial; the "
                                                              "metric is measured on them")
    robust: RobustMetricSpec | None = Field(
        None, description="per-epoch PGD on the validation subset, reported as val_robust_acc")
    objective: dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(
        None, max_length=16,
        description="weights of reported metrics; each trial also reports their sum as 'objective'")
    perturbation_interval: int = Field(1, ge=1, le=1000, description="PBT: epochs between explore steps")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the random search")

    @model_validator(mode="before")
    @classmethod
    def _robust_default(cls, data: Any) -> Any:
        """Selecting on robust accuracy switches the per-epoch attack on with its defaults."""
        if not isinstance(data, dict):
            return data
        metrics = data.get("metrics")
        if isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics):
            # a multi-objective search: Optuna's front needs every trial to run to the end (FIFO), and
            # the best trial is picked on the first metric unless 'metric' names another
            modes = data.get("modes")
            data = {**data, "scheduler": data.get("scheduler", "fifo"),
                    "modes": modes if modes is not None or len(metrics) < 2 else ["max"] * len(metrics)}
            if "metric" not in data:
                data["metric"] = metrics[0]
                if "mode" not in data and isinstance(data["modes"], list) and data["modes"]:
                    data["mode"] = data["modes"][0]
        if data.get("robust") is None:
            weights = data.get("objective")
            wanted = [data.get("metric"), *(weights if isinstance(weights, dict) else []),
                      *(metrics if isinstance(metrics, list) else [])]
            if "val_robust_acc" in wanted:
                data = {**data, "robust": {}}
        return data

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Errors carry their own locations (base.<field>); the stored base has every default filled in.
        return TrainSpec.model_validate(v).resolved()

    @field_validator("search_space")
    @classmethod
    def _search_space(cls, v: dict[str, SearchDomain], info: ValidationInfo) -> dict[str, SearchDomain]:
        from pydantic import ValidationError
        from pydantic_core import InitErrorDetails, PydanticCustomError

        if not v:
            raise ValueError("the search space needs at least one key")
        base = info.data.get("base")
        if base is None:  # the base failed validation; its errors are reported
            return v
        from ensemble_core.methods import hyperparameter_model

        hp_fields = hyperparameter_model(base["method"]).model_fields
        errors = []

        def bad(key: str, msg: str, value: Any) -> None:
            msg = msg.replace("{", "(").replace("}", ")")
            errors.append(InitErrorDetails(type=PydanticCustomError("search_space", msg), loc=(key,),
                                           input=value))

        for key, dom in v.items():
            section, name = tune_target(key)
            if section == "hyperparameters" and name not in hp_fields:
                bad(key, f"{base['method']} has no hyperparameter {name!r}; searchable: "
                         f"{', '.join([*hp_fields, 'lr'])}", key)
                continue
            annotation = hp_fields[name].annotation if section == "hyperparameters" else float
            if dom.type in ("uniform", "loguniform") and not _accepts_float(annotation):
                bad(key, f"{name} does not take real numbers: use choice, grid or randint", dom.type)
                continue
            probes: list[Any] = list(dom.values or [])
            if dom.type in ("uniform", "loguniform"):
                probes = [dom.low, dom.high]
            elif dom.type == "randint":
                probes = [int(dom.low or 0), int(dom.high or 0) - 1]  # high is exclusive
            for value in probes:
                try:
                    TrainSpec.model_validate(apply_tune_config(base, {key: value}))
                except ValidationError as e:
                    first = e.errors(include_url=False)[0]
                    bad(key, f"value {value!r} is invalid: {first['msg']}", value)
                    break
        if errors:
            raise ValidationError.from_exception_data("search_space", errors)
        return v

    @model_validator(mode="after")
    def _check_search(self) -> TuneSpec:
        problem = _tune_metric_problem(self.metric)
        if problem:
            raise ValueError(f"metric: {problem}")
        if self.objective is not None:
            if self.metric != "objective":
                raise ValueError("objective: the weights are only used with metric 'objective'")
            for name in self.objective:
                problem = "it cannot weigh itself" if name == "objective" else _tune_metric_problem(name)
                if problem:
                    raise ValueError(f"objective: {problem}")
        elif self.metric == "objective":
            raise ValueError("objective: metric 'objective' needs weights, e.g. {'val_clean_acc': 0.5, "
                             "'val_robust_acc': 0.5}")
        if self.metrics is not None:
            self._check_objectives()
        if self.search_alg == "optuna":
            grids = [k for k, d in self.search_space.items() if d.type == "grid"]
            if grids:
                raise ValueError(f"search_alg: Optuna samples its values; {grids[0]!r} is a grid: use choice")
            if self.scheduler == "pbt":
                raise ValueError("scheduler: PBT mutates the trials' values itself and cannot run with Optuna's "
                                 "search: use 'asha' or 'fifo'")
        if self.search_alg == "grid":
            not_grid = [k for k, d in self.search_space.items() if d.type not in ("grid", "choice")]
            if not_grid:
                raise ValueError(f"search_alg: 'grid' needs choice or grid values, but {not_grid[0]!r} is "
                                 f"{self.search_space[not_grid[0]].type}")
        trials = 1 if self.search_alg == "grid" else self.num_samples  # as workers.ray_tune runs it
        for dom in self.search_space.values():  # every grid combination runs num_samples times
            if dom.type == "grid" or (self.search_alg == "grid" and dom.type == "choice"):
                trials *= len(dom.values or [])
        if trials > MAX_TRIALS:
            raise ValueError(f"num_samples: the search would run {trials} trials (num_samples x the grid's "
                             f"combinations), more than {MAX_TRIALS}")
        size = TRAIN_SPLIT_SIZES.get(self.base["dataset"])
        if size is not None and self.val_size >= size:
            raise ValueError(f"val_size: {self.val_size} must be smaller than the {self.base['dataset']} "
                             f"training split ({size})")
        return self

    def _check_objectives(self) -> None:
        metrics, modes = self.metrics or [], self.modes or []
        for name in metrics:
            problem = ("'objective' is a weighted sum for a single-metric search; list the metrics themselves"
                       if name == "objective" else _tune_metric_problem(name))
            if problem:
                raise ValueError(f"metrics: {problem}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics: each metric once, got {metrics}")
        if len(modes) != len(metrics):
            raise ValueError(f"modes: one mode per metric: {len(metrics)} metric(s), {len(modes)} mode(s)")
        if self.search_alg != "optuna":
            raise ValueError(f"search_alg: a multi-objective search ('metrics') needs 'optuna', not "
                             f"{self.search_alg!r}")
        if self.scheduler != "fifo":
            raise ValueError(f"scheduler: {self.scheduler!r} stops or clones trials on a single metric; a "
                             f"multi-objective search runs every trial to the end: use 'fifo' (the default "
                             f"with 'metrics')")
        if self.metric not in metrics:
            raise ValueError(f"metric: the best trial is picked on one of the metrics {metrics}, not "
                             f"{self.metric!r}")
        if self.mode != modes[metrics.index(self.metric)]:
            raise ValueError(f"mode: {self.metric!r} is '{modes[metrics.index(self.metric)]}' in 'modes'")

    def objectives(self) -> tuple[list[str], list[str]]:
        """The metrics the search optimises and their modes: ``metrics``/``modes``, or ``[metric]``/``[mode]``."""
        if self.metrics:
            return list(self.metrics), list(self.modes or ["max"] * len(self.metrics))
        return [self.metric], [self.mode]

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def trial_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        """The train spec a trial runs: the base, the sampled values, the search's validation split."""
        return {**apply_tune_config(self.base, config), "val_size": self.val_size}

    def best_train_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        """A full train job from a trial's values: the user's base (its own val_size) with the values."""
        return apply_tune_config(self.base, config)


def _accepts_float(annotation: Any) -> bool:
    import typing

    if annotation is float:
        return True
    return float in typing.get_args(annotation)


SPEC_MODELS: dict[str, type[StrictModel]] = {"train": TrainSpec, "evaluate": EvaluateSpec, "tune": TuneSpec}
