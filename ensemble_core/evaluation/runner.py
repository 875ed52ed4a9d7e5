"""The plan and the per-example computation of an evaluation: white-box, gradient-free and transfer attacks on
ensembles, scored per example. :func:`ensemble_core.evaluation.evaluate.run_evaluation` runs a plan through
:func:`compute` and :func:`ensemble_core.evaluation.records.summarize` (this module imports neither).

The library part of an evaluate job; Ray-free, usable from a notebook::

    from ensemble_core.evaluation import run_evaluation
    result = run_evaluation({"target_checkpoint": "runs/x/ensemble.pt", "n_examples": 500,
                             "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "restarts": 5}]},
                            target="runs/x/ensemble.pt", out_dir="runs/x/eval")

How a number is made (docs/evaluation.md):

* A fixed, seeded subset of the test split (``ensemble_core.data.test_subset``). Transfer attacks may use
  a larger slice; the white-box slice is contained in it.
* Each white-box attack runs on the ensemble's attack target (the deployed rule, or its stated
  differentiable surrogate) and every adversarial example is scored on the **deployed** rule (a vote's
  abstention counts as wrong). An example is robust at eps only if it is classified correctly clean and
  on every adversarial copy: every loss, every restart (restarts only re-attack the examples still
  robust, which gives the same per-example worst case). The worst-case rows take the per-example
  minimum over all attacks, where a perturbation found within eps' ≤ eps also counts at eps.
* Per-example state is saved as it goes (``state_path``) and resumed; ``batch_range`` lets a caller
  (the Ray job in ``workers/ray_eval.py``) compute a shard; :func:`summarize` merges and reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from ensemble_core.checkpoint import checkpoint_spec, ensemble_from_state, load_checkpoint
from ensemble_core.data import DATASET_INFO, TensorDataset, load_dataset, test_subset, to_float
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation.attacks import (
    MINIMAL_PERTURBATION,
    RANDOMISED,
    attack_losses,
    attack_norm,
    build_attack,
    cw_objective,
    default_alpha,
    derive_seed,
    run_attack,
    run_scored,
    sanitize,
)
from ensemble_core.evaluation.codeversion import evaluation_code_fingerprint
from ensemble_core.evaluation.state import EvalState
from ensemble_core.evaluation.state import column as _col
from ensemble_core.models import place
from ensemble_core.spec import AttackSpec, EvaluateSpec

ProgressFn = Callable[[float, str], None]

PROTOCOL_TRANSFER_EPS = {"mnist": [0.1, 0.15, 0.2, 0.25], "fashion_mnist": [0.08, 0.1, 0.15, 0.2],
                         "cifar10": [0.01, 0.02, 0.03], "cifar100": [0.01, 0.02, 0.03],
                         "synthetic": [0.1, 0.15, 0.2, 0.25]}


class EvaluationStopped(Exception):
    """``should_stop()`` asked the evaluation to stop; the state was saved first."""


PROTOCOL_TRANSFER_PGD_SEEDS = 3


def protocol_transfer_attacks(dataset: str) -> list[AttackSpec]:
    """PROTOCOL.md's black-box set: FGSM; BIM, MIM (momentum 1.0), PGD (random start, 3 seeds), 10 steps of
    eps/5; each with cross-entropy and the CW margin (κ = 0.1), crafted on the surrogate's log of mean
    probabilities (:func:`transfer_view`)."""
    eps = PROTOCOL_TRANSFER_EPS.get(dataset, [0.1, 0.15, 0.2, 0.25])
    common: dict[str, Any] = {"eps": eps, "losses": ["ce", "cw"], "kappa": 0.1}
    return [AttackSpec(name="fgsm", **common),
            AttackSpec(name="bim", steps=10, alpha_ratio=0.2, **common),
            AttackSpec(name="mim", steps=10, alpha_ratio=0.2, momentum=1.0, **common),
            AttackSpec(name="pgd", steps=10, alpha_ratio=0.2, random_start=True,
                       restarts=PROTOCOL_TRANSFER_PGD_SEEDS, **common)]


def transfer_view(ens: Ensemble) -> Ensemble:
    """What transfer attacks differentiate on a surrogate: the log of its (voters') mean probabilities.

    PROTOCOL.md and the CLDL reference code craft on the log of mean probabilities: a surrogate whose own
    attack target already is one (``log_mean_probs``, DKD's ``log_mean_probs_aux``) keeps it; any other
    (``mean_logits``, ...) is attacked through ``log_mean_probs`` over all its members.
    """
    target = ens.attack_target()
    return target if target.rule.outputs == "log_probs" else ens.with_combine("log_mean_probs")


# ------------------------------------------------------------------------------------------ models


@dataclass
class EvalModel:
    """An ensemble under evaluation with where it came from."""

    name: str
    ensemble: Ensemble
    ref: str
    fingerprint: str
    train_spec: dict[str, Any] | None = None
    group: str = "baseline"  # surrogates: "baseline" (baseline ensembles) or "same-method" (the method, other seeds)

    @property
    def deployed(self) -> str:
        return self.ensemble.combine

    @property
    def attacked(self) -> str:
        return self.ensemble.attack_target().combine

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "ref": self.ref, "members": len(self.ensemble),
                             "deployed_rule": self.deployed, "attacked_rule": self.attacked,
                             "transfer_view": transfer_view(self.ensemble).combine, "group": self.group,
                             "fingerprint": self.fingerprint[:16]}
        if self.train_spec:
            d.update(method=self.train_spec.get("method"), architecture=self.train_spec.get("architecture"),
                     dataset=self.train_spec.get("dataset"), train_seed=self.train_spec.get("seed"),
                     epochs=self.train_spec.get("epochs"), hyperparameters=self.train_spec.get("hyperparameters"))
        return d


def _weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(obj: Ensemble | str | Path | EvalModel, name: str, *, combine: str | None = None,
               device: torch.device | str = "cpu") -> EvalModel:
    """An :class:`EvalModel` from an in-memory ensemble or a checkpoint path (deployed rule unless ``combine``)."""
    if isinstance(obj, EvalModel):
        return obj
    if isinstance(obj, Ensemble):
        ens = obj.with_combine(combine) if combine else obj
        place(ens, device).eval()
        return EvalModel(name, ens, "in-memory", _weights_fingerprint(ens) + ":" + ens.combine)
    path = Path(obj)
    if not path.exists():
        raise FileNotFoundError(f"{name}: checkpoint {path} does not exist")
    state = load_checkpoint(path, map_location=device)
    ens = ensemble_from_state(state, combine=combine, device=device)
    return EvalModel(name, ens, str(path), _weights_fingerprint(ens) + ":" + ens.combine, checkpoint_spec(state))


@contextlib.contextmanager
def _frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Parameters stop requiring grad while attacking (CW's ``backward`` would fill their ``.grad``); restored after."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    for p, _ in saved:
        p.requires_grad_(False)
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)
        for m, t in modes:
            m.train(t)


@torch.no_grad()
def deployed_predict(ens: Ensemble, x: torch.Tensor) -> torch.Tensor:
    """Labels under the deployed rule (``-1`` = abstain, counted wrong)."""
    return ens.rule.predict_labels(ens.member_logits(x))


# -------------------------------------------------------------------------------------------- plan


def _subset_indices(n_total: int, which: str, n: int | None, seed: int) -> list[int]:
    """Test-split indices that :func:`ensemble_core.data.test_subset` selects (it returns images; this the indices)."""
    probe = TensorDataset(torch.zeros(n_total, 1, 1, 1, dtype=torch.uint8), torch.arange(n_total),
                          DATASET_INFO["synthetic"])
    return test_subset(probe, which, n, seed).labels.tolist()


@dataclass
class EvalPlan:
    """Everything an evaluation (or one shard of it) needs; built identically in every process."""

    spec: EvaluateSpec
    dataset: str
    num_classes: int
    indices: list[int]
    images: torch.Tensor
    labels: torch.Tensor
    in_wb: torch.Tensor
    in_tr: torch.Tensor
    in_check: torch.Tensor
    models: list[EvalModel]
    surrogates: list[EvalModel]
    wb: list[AttackSpec]
    tr: list[AttackSpec]
    member_eps: float | None
    member_alpha: float | None
    convergence: tuple[int, list[float]] | None  # (white-box attack index, every eps of that attack)
    large_eps: dict[str, float]
    device: torch.device
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.indices)

    def batches(self) -> list[tuple[int, int]]:
        bs = self.spec.batch_size
        return [(i, min(i + bs, self.n)) for i in range(0, self.n, bs)]


def _fingerprint(plan: EvalPlan) -> str:
    payload = {"spec": plan.spec.model_dump(mode="json", exclude={"workers", "use_gpu", "target_job",
                                                                  "target_checkpoint", "transfer_from_job",
                                                                  "transfer_from_checkpoint", "baseline_job",
                                                                  "baseline_checkpoint"}),
               "models": [(m.name, m.fingerprint) for m in plan.models],
               "surrogates": [(m.name, m.fingerprint) for m in plan.surrogates],
               "indices": hashlib.sha256(json.dumps(plan.indices).encode()).hexdigest(),
               "tr": [a.model_dump(mode="json") for a in plan.tr], "dataset": plan.dataset,
               "torchattacks": getattr(torchattacks, "__version__", ""), "code": evaluation_code_fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare_plan(spec: EvaluateSpec | dict[str, Any], target: Ensemble | str | Path | EvalModel, *,
                 baseline: Ensemble | str | Path | EvalModel | None = None,
                 surrogates: Sequence[Ensemble | str | Path | EvalModel] | dict[str, Any] = (),
                 dataset: str | None = None, data_dir: str | None = None,
                 device: torch.device | str | None = None, test_set: TensorDataset | None = None,
                 surrogate_groups: dict[str, str] | None = None) -> EvalPlan:
    """Resolve models, the example subset and every attack's parameters.

    ``surrogate_groups`` names each surrogate's group (default ``baseline``; e.g. ``same-method`` for the
    method's own ensemble trained with other seeds): transfer records are reported per group and over all.
    """
    spec = spec if isinstance(spec, EvaluateSpec) else EvaluateSpec.model_validate(spec)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
    models = [load_model(target, "target", combine=spec.combine, device=device)]
    if baseline is not None:
        models.append(load_model(baseline, "baseline", device=device))
    named = surrogates.items() if isinstance(surrogates, dict) else [
        (f"surrogate{i + 1}" if len(surrogates) > 1 else "surrogate", s) for i, s in enumerate(surrogates)]
    surr = [load_model(s, n, device=device) for n, s in named]
    for s in surr:
        s.group = (surrogate_groups or {}).get(s.name, s.group)

    ds_names = {m.train_spec.get("dataset") for m in models + surr if m.train_spec}
    if dataset is None and test_set is not None and not ds_names:
        dataset = test_set.info.name
    if dataset is None:
        if len(ds_names) != 1:
            raise ValueError("dataset: pass dataset= for in-memory ensembles (or models trained on one data set)"
                             if not ds_names else f"dataset: the models were trained on different data sets "
                                                  f"{sorted(ds_names)}")
        dataset = ds_names.pop()
    elif ds_names and ds_names != {dataset}:
        raise ValueError(f"dataset: {dataset!r} does not match the models' training data {sorted(ds_names)}")
    info = test_set.info if test_set is not None else DATASET_INFO[dataset]
    if data_dir is None:
        data_dir = next((m.train_spec.get("data_dir") for m in models if m.train_spec and m.train_spec.get("data_dir")),
                        None)
    test = test_set if test_set is not None else load_dataset(dataset, "test", data_dir)

    tr_attacks = list(spec.transfer_attacks)
    if surr and not tr_attacks:
        tr_attacks = protocol_transfer_attacks(dataset)
    if tr_attacks and not surr:
        raise ValueError("transfer_attacks: transfer attacks need a surrogate (transfer_from_job / "
                         "transfer_from_checkpoint)")
    n_wb = spec.n_examples
    n_tr = (spec.transfer_n_examples or n_wb) if tr_attacks else 0
    which = spec.split
    base = _subset_indices(len(test), which, None, 0)
    wb_set = set(_subset_indices(len(test), which, n_wb, spec.seed))
    tr_set = set(_subset_indices(len(test), which, n_tr, spec.seed)) if n_tr else set()
    order = [i for i in base if i in wb_set or i in tr_set]
    idx_t = torch.tensor(order, dtype=torch.long)
    in_wb = torch.tensor([i in wb_set for i in order], dtype=torch.bool)
    in_tr = torch.tensor([i in tr_set for i in order], dtype=torch.bool)
    in_check = in_wb & (torch.cumsum(in_wb.long(), 0) <= spec.checks.n_examples)

    wb = list(spec.attacks)
    member_eps = member_alpha = None
    if spec.member_transfer is not None and any(len(m.ensemble) > 1 for m in models):
        linf = [e for a in wb if attack_norm(a) == "Linf" for e in sorted(a.eps)[len(a.eps) // 2:][:1]]
        linf += [e for a in tr_attacks for e in sorted(a.eps)[len(a.eps) // 2:][:1]]
        member_eps = spec.member_transfer.eps or (linf[0] if linf else None)
        if member_eps is not None:
            member_alpha = spec.member_transfer.alpha or member_eps / 5
    convergence = None
    if spec.checks.convergence:
        for i, a in enumerate(wb):
            if a.name in ("pgd", "pgdl2"):
                convergence = (i, sorted(float(e) for e in a.eps))
                break
    large: dict[str, float] = {}
    norms = {attack_norm(a) for a in wb}
    if spec.checks.large_eps is not None and (not wb or "Linf" in norms):
        large["Linf"] = spec.checks.large_eps
    if "L2" in norms:
        dim = info.in_channels * info.image_size * info.image_size
        large["L2"] = spec.checks.large_eps_l2 or 0.5 * math.sqrt(dim)
    plan = EvalPlan(spec, dataset, info.num_classes, order, test.images[idx_t], test.labels[idx_t], in_wb, in_tr,
                    in_check, models, surr, wb, tr_attacks, member_eps, member_alpha, convergence, large, device)
    plan.fingerprint = _fingerprint(plan)
    return plan


# ------------------------------------------------------------------------------------- work units


@dataclass
class Unit:
    key: str
    kind: str
    cost: float  # rough forward+backward passes per example, for progress
    attack: int | None = None
    eps: float | None = None
    norm: str | None = None


def _steps_cost(a: AttackSpec) -> float:
    if a.name == "fgsm":
        return 1
    if a.name == "square":
        return a.n_queries / 3
    if a.name == "autoattack":
        return 1500
    return a.steps


def plan_units(plan: EvalPlan) -> list[Unit]:
    units = [Unit("clean", "clean", 4), Unit("attack_unit_tests", "unit", 1)]
    nm = len(plan.models)
    for i, a in enumerate(plan.wb):
        restarts = a.restarts if a.name in RANDOMISED else 1
        per = _steps_cost(a) * restarts * len(attack_losses(a)) * nm
        if a.name in MINIMAL_PERTURBATION:
            units.append(Unit(f"wb|{i}|dist", "wb", per, i, None, attack_norm(a)))
        else:
            units += [Unit(f"wb|{i}|{e:g}", "wb", per, i, e, attack_norm(a)) for e in a.eps]
    for norm, e in plan.large_eps.items():
        units.append(Unit(f"check_large|{norm}", "large", plan.spec.checks.large_eps_steps * 2 * nm, None, e, norm))
    if plan.convergence is not None:
        i, eps_list = plan.convergence
        a = plan.wb[i]
        units += [Unit(f"check_conv|{e:g}", "conv", 2 * a.steps * a.restarts * len(attack_losses(a)) * nm, i, e,
                       attack_norm(a)) for e in eps_list]
    if plan.member_eps is not None and plan.spec.member_transfer is not None:
        units.append(Unit("member_transfer", "mt", plan.spec.member_transfer.steps * nm, None, plan.member_eps,
                          "Linf"))
    for i, a in enumerate(plan.tr):
        restarts = a.restarts if a.name in RANDOMISED else 1
        per = _steps_cost(a) * restarts * len(attack_losses(a)) * max(len(plan.surrogates), 1)
        units += [Unit(f"tr|{i}|{e:g}", "tr", per, i, e, attack_norm(a)) for e in a.eps]
    return units




class _Runner:
    def __init__(self, plan: EvalPlan, state: EvalState, *, state_path: str | Path | None,
                 cache_dir: str | Path | None, progress: ProgressFn | None, should_stop: Callable[[], bool] | None,
                 log: Callable[[str], None], save_every_s: float) -> None:
        self.plan, self.state, self.state_path = plan, state, state_path
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.progress, self.should_stop, self.log = progress, should_stop, log
        self.save_every_s = save_every_s
        self.seed = plan.spec.seed

    # ----------------------------------------------------------------------------------- helpers
    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.plan.images[lo:hi].to(self.plan.device)), self.plan.labels[lo:hi].to(self.plan.device)

    def clean_ok(self, model: str, lo: int, hi: int) -> torch.Tensor:
        return self.state.get_bools(_col(model, "clean"), lo, hi).to(self.plan.device)

    def attack_worst_case(self, m: EvalModel, a: AttackSpec, eps: float, x: torch.Tensor, y: torch.Tensor,
                          robust: torch.Tensor, tag: tuple[Any, ...], counter: str,
                          losses: list[str] | None = None, restarts: int | None = None,
                          steps: int | None = None) -> torch.Tensor:
        """Attack the still-robust rows under every loss and restart; returns the per-example worst case.

        Iterative attacks score every iterate on the deployed rule (an example is broken if any iterate is
        misclassified); the example kept is then re-checked, after projection into the threat model, on the
        deployed rule, so only breaks shown by a valid example count. Losses that do not apply to the model's
        rule (vote-aware losses on a rule that is not a vote) are skipped.
        """
        ens = m.ensemble
        target = ens.attack_target()
        norm = attack_norm(a)
        robust = robust.clone()
        n_restarts = restarts or (a.restarts if a.name in RANDOMISED else 1)
        for loss in losses or attack_losses(a, ens.rule):
            for r in range(n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return robust
                seed = derive_seed(self.seed, *tag, loss, r)
                atk = build_attack(target, a, eps, loss, num_classes=self.plan.num_classes, seed=seed,
                                   deployed=ens.rule, steps=steps)
                out = run_scored(atk, x[idx], y[idx], seed, ens.rule.predict_labels)
                adv, bad = sanitize(out.adv, x[idx], eps, norm)
                self.state.add(counter, int(bad.sum()))
                robust[idx] = deployed_predict(ens, adv) == y[idx]
        return robust

    # --------------------------------------------------------------------------------- the units
    def run_clean(self, b: int, lo: int, hi: int) -> None:
        """Clean predictions of every example; the model-level checks on the check rows (as AutoAttack
        checks a first batch): randomness, probability outputs and zero input gradients."""
        x, y = self.batch(lo, hi)
        pos = range(lo, hi)
        rows = self.plan.in_check[lo:hi]
        idx = rows.nonzero().squeeze(1).to(x.device)
        for m in self.plan.models:
            ens, target = m.ensemble, m.ensemble.attack_target()
            with torch.no_grad():
                z = ens.member_logits(x)
            self.state.set_bools(_col(m.name, "clean"), pos, ens.rule.predict_labels(z) == y)
            for k in range(z.shape[0]):
                self.state.set_bools(_col(m.name, "member_clean", k), pos, z[k].argmax(-1) == y)
            full = torch.zeros(hi - lo, dtype=torch.bool)
            checks = {k: full.clone() for k in ("randomized", "prob_outputs", "log_prob_outputs", "zero_grad|ce",
                                                "zero_grad|cw")}
            if idx.numel():
                xc, yc = x[idx], y[idx]
                xg = xc.clone().requires_grad_(True)
                z_grad = ens.member_logits(xg)  # a second pass on the same input: it must agree with the first
                out = target.rule.scores(z_grad)
                with torch.no_grad():
                    z1 = z[:, idx]
                    z2 = z_grad.detach()
                    randomized = ((z1 - z2).abs().amax(dim=(0, 2)) > 0) | (
                        ens.rule.predict_labels(z1) != ens.rule.predict_labels(z2))
                    probs = ((out >= -1e-6) & (out <= 1 + 1e-6)).all(1) & ((out.sum(1) - 1).abs() < 1e-4)
                    log_probs = (out <= 1e-6).all(1) & (torch.logsumexp(out, 1).abs() < 1e-4)
                (g_ce,) = torch.autograd.grad(F.cross_entropy(out, yc, reduction="sum"), xg, retain_graph=True)
                (g_cw,) = torch.autograd.grad(cw_objective(out, yc, kappa=1e9).sum(), xg)
                for key, val in (("randomized", randomized), ("prob_outputs", probs), ("log_prob_outputs", log_probs),
                                 ("zero_grad|ce", g_ce.flatten(1).abs().sum(1) == 0),
                                 ("zero_grad|cw", g_cw.flatten(1).abs().sum(1) == 0)):
                    checks[key][idx.cpu()] = val.cpu()
            for key, val in checks.items():
                self.state.set_bools(f"{m.name}|{key}", pos, val, rows)

    def run_unit_tests(self, u: Unit, b: int, lo: int, hi: int) -> None:
        """Zimmermann-style attack unit tests, once per evaluation (in the shard holding batch 0)."""
        if b != 0:
            return
        from ensemble_core.evaluation.sanity import attack_unit_test

        deployed = self.plan.models[0].deployed
        combine = deployed if deployed in ("mean_logits", "mean_probs", "log_mean_probs", "vote", "plurality") \
            else "log_mean_probs"
        for kind, attacks in (("wb", self.plan.wb), ("tr", self.plan.tr)):
            for i, a in enumerate(attacks):
                for e in a.eps:
                    key = _col("unit_test", kind, i, float(e))
                    try:
                        r = attack_unit_test(a, e, combine=combine, seed=self.seed)
                    except ValueError as err:  # eps too large for a witness inside [0, 1]
                        self.log(f"attack unit test skipped for {kind} attack {i} at eps {e:g}: {err}")
                        self.state.counters[key + "|skipped"] = 1
                        continue
                    self.state.counters[key + "|n"] = int(r["n"])  # type: ignore[arg-type]
                    self.state.counters[key + "|missed"] = int(r["missed"])  # type: ignore[arg-type]

    def run_wb(self, u: Unit, b: int, lo: int, hi: int) -> None:
        a = self.plan.wb[u.attack]  # type: ignore[index]
        x, y = self.batch(lo, hi)
        rows = self.plan.in_wb[lo:hi].to(x.device)
        pos = range(lo, hi)
        for m in self.plan.models:
            ok = self.clean_ok(m.name, lo, hi) & rows
            if a.name in MINIMAL_PERTURBATION:  # one CW-L2 run: the L2 distance of the adversarial found
                dist: list[float | None] = [None] * (hi - lo)
                idx = ok.nonzero().squeeze(1)
                if idx.numel():
                    seed = derive_seed(self.seed, "wb", u.attack, "dist", b)
                    atk = build_attack(m.ensemble.attack_target(), a, 0.0, "cw", num_classes=self.plan.num_classes)
                    adv = run_attack(atk, x[idx], y[idx], seed)
                    adv, bad = sanitize(adv, x[idx], None, "L2")
                    self.state.add(_col(m.name, "invalid", "wb", u.attack), int(bad.sum()))
                    fooled = deployed_predict(m.ensemble, adv) != y[idx]
                    d = (adv - x[idx]).flatten(1).norm(dim=1)
                    for j, (f, dd) in zip(idx.tolist(), zip(fooled.tolist(), d.tolist(), strict=True), strict=True):
                        dist[j] = dd if f else None
                self.state.set_floats(_col(m.name, "wb", u.attack, "dist"), pos, [
                    v if r else None for v, r in zip(dist, rows.tolist(), strict=True)])
                self.state.set_bools(_col(m.name, "wb", u.attack, "ran"), pos, ok, rows)
                continue
            robust = self.attack_worst_case(m, a, u.eps, x, y, ok, ("wb", u.attack, u.eps, b),  # type: ignore[arg-type]
                                            _col(m.name, "invalid", "wb", u.attack))
            self.state.set_bools(_col(m.name, "wb", u.attack, u.eps), pos, robust, rows)

    def run_large(self, u: Unit, b: int, lo: int, hi: int) -> None:
        rows = self.plan.in_check[lo:hi]
        if not rows.any():
            for m in self.plan.models:
                self.state.set_bools(_col(m.name, "large", u.norm), range(lo, hi), rows, rows)
            return
        x, y = self.batch(lo, hi)
        a = AttackSpec(name="pgd" if u.norm == "Linf" else "pgdl2", eps=[u.eps],
                       steps=self.plan.spec.checks.large_eps_steps,
                       losses=["ce", "cw"], kappa=0.0, random_start=True)
        for m in self.plan.models:
            ok = self.clean_ok(m.name, lo, hi) & rows.to(x.device)
            robust = self.attack_worst_case(m, a, u.eps, x, y, ok, ("large", u.norm, b),  # type: ignore[arg-type]
                                            _col(m.name, "invalid", "large"))
            self.state.set_bools(_col(m.name, "large", u.norm), range(lo, hi), robust, rows)

    def run_conv(self, u: Unit, b: int, lo: int, hi: int) -> None:
        """The reported attack again at ``u.eps`` with twice the steps (same restarts, losses and random starts);
        what it breaks enters the worst case."""
        rows = self.plan.in_check[lo:hi]
        key = _col("conv", "2k", u.eps)
        if not rows.any():
            for m in self.plan.models:
                self.state.set_bools(_col(m.name, key), range(lo, hi), rows, rows)
            return
        x, y = self.batch(lo, hi)
        a = self.plan.wb[u.attack]  # type: ignore[index]
        for m in self.plan.models:
            ok = self.clean_ok(m.name, lo, hi) & rows.to(x.device)
            robust = self.attack_worst_case(m, a, u.eps, x, y, ok, ("wb", u.attack, u.eps, b),  # type: ignore[arg-type]
                                            _col(m.name, "invalid", "conv"), steps=2 * a.steps)
            self.state.set_bools(_col(m.name, key), range(lo, hi), robust, rows)

    def run_member_transfer(self, u: Unit, b: int, lo: int, hi: int) -> None:
        mt = self.plan.spec.member_transfer
        assert mt is not None
        x, y = self.batch(lo, hi)
        rows = self.plan.in_wb[lo:hi]
        for m in self.plan.models:
            members = list(m.ensemble.members)
            for i, mi in enumerate(members):
                seed = derive_seed(self.seed, "mt", u.eps, i, b)
                atk = torchattacks.PGD(mi, eps=u.eps, alpha=self.plan.member_alpha, steps=mt.steps, random_start=True)
                adv, bad = sanitize(run_attack(atk, x, y, seed), x, u.eps, "Linf")
                self.state.add(_col(m.name, "invalid", "mt"), int(bad.sum()))
                with torch.no_grad():
                    for j, mj in enumerate(members):
                        self.state.set_bools(_col(m.name, "mt", i, j), range(lo, hi), mj(adv).argmax(-1) == y, rows)

    def transfer_examples(self, s: EvalModel, a: AttackSpec, a_idx: int, eps: float, loss: str, r: int,
                          x: torch.Tensor, y: torch.Tensor, rows_idx: list[int]) -> torch.Tensor:
        """Adversarial examples crafted on surrogate ``s`` (cached on disk when a cache dir is set).

        They depend only on the surrogate, the attack and the images, never on the target, so every target
        scored with the same cache sees the same examples."""
        tests = [self.plan.indices[i] for i in rows_idx]
        view = transfer_view(s.ensemble)
        key = transfer_cache_key(f"{s.fingerprint}|view={view.combine}", a, eps, loss, r, self.seed,
                                 self.plan.dataset, tests)
        path = self.cache_dir / key[:2] / f"{key}.pt" if self.cache_dir else None
        if path is not None and path.exists():
            try:
                return torch.load(path, map_location=x.device, weights_only=True)
            except Exception as e:  # a torn or foreign file: recompute and overwrite
                self.log(f"transfer cache entry {path} unreadable ({e}); recomputing")
        seed = derive_seed("tr", transfer_cache_key(f"{s.fingerprint}|view={view.combine}", a, eps, loss, r,
                                                    self.seed, self.plan.dataset, tests, with_code=False))
        atk = build_attack(view, a, eps, loss, num_classes=self.plan.num_classes, seed=seed)
        adv, bad = sanitize(run_attack(atk, x, y, seed), x, eps, attack_norm(a))
        self.state.add(_col(s.name, "invalid", "tr", a_idx), int(bad.sum()))
        if path is not None:
            _atomic_save(adv.cpu(), path)
        return adv

    def run_tr(self, u: Unit, b: int, lo: int, hi: int) -> None:
        a = self.plan.tr[u.attack]  # type: ignore[index]
        rows = self.plan.in_tr[lo:hi]
        if not rows.any():
            for m in self.plan.models:
                self.state.set_bools(_col(m.name, "tr", u.attack, u.eps), range(lo, hi), rows, rows)
            return
        x_all, y_all = self.batch(lo, hi)
        ridx = rows.nonzero().squeeze(1)
        x, y = x_all[ridx.to(x_all.device)], y_all[ridx.to(x_all.device)]
        rows_idx = [lo + i for i in ridx.tolist()]
        robust = {m.name: self.clean_ok(m.name, lo, hi)[ridx.to(x.device)] for m in self.plan.models}
        n_restarts = a.restarts if a.name in RANDOMISED else 1
        for s in self.plan.surrogates:
            for loss in attack_losses(a):
                per_copy = {m.name: torch.ones_like(robust[m.name]) for m in self.plan.models}
                for r in range(n_restarts):
                    adv = self.transfer_examples(s, a, u.attack, u.eps, loss, r, x, y, rows_idx)  # type: ignore[arg-type]
                    for m in self.plan.models:
                        per_copy[m.name] &= deployed_predict(m.ensemble, adv) == y
                for m in self.plan.models:
                    full = torch.zeros(hi - lo, dtype=torch.bool)
                    full[ridx] = (per_copy[m.name] & robust[m.name]).cpu()
                    self.state.set_bools(_col(m.name, "tr", u.attack, u.eps, s.name, loss), range(lo, hi), full, rows)
                    robust[m.name] = robust[m.name] & per_copy[m.name]
        for m in self.plan.models:
            full = torch.zeros(hi - lo, dtype=torch.bool)
            full[ridx] = robust[m.name].cpu()
            self.state.set_bools(_col(m.name, "tr", u.attack, u.eps), range(lo, hi), full, rows)

    # --------------------------------------------------------------------------------- the loop
    def run(self, batch_range: tuple[int, int] | None = None) -> EvalState:
        batches = self.plan.batches()
        b0, b1 = batch_range or (0, len(batches))
        units = plan_units(self.plan)
        total = sum(u.cost for u in units) * (b1 - b0) or 1.0
        done_cost = 0.0
        handlers = {"clean": lambda u, b, lo, hi: self.run_clean(b, lo, hi), "unit": self.run_unit_tests,
                    "wb": self.run_wb,
                    "large": self.run_large, "conv": self.run_conv, "mt": self.run_member_transfer,
                    "tr": self.run_tr}
        models = [m.ensemble for m in self.plan.models + self.plan.surrogates]
        with _frozen(models):
            for u in units:
                t0 = time.perf_counter()
                for b in range(b0, b1):
                    piece = f"{u.key}|b{b}"
                    if piece not in self.state.done:
                        lo, hi = batches[b]
                        handlers[u.kind](u, b, lo, hi)
                        self.state.done.add(piece)
                        self.state.maybe_save(self.state_path, self.save_every_s)
                    done_cost += u.cost
                    if self.progress is not None:
                        self.progress(done_cost / total, f"{u.key} batch {b + 1}/{len(batches)}")
                    if self.should_stop is not None and self.should_stop():
                        if self.state_path is not None:
                            self.state.save(self.state_path)
                        raise EvaluationStopped("stop requested")
                self.state.timings[u.key] = self.state.timings.get(u.key, 0.0) + time.perf_counter() - t0
        if self.state_path is not None:
            self.state.save(self.state_path)
        return self.state


def transfer_cache_key(surrogate_fingerprint: str, a: AttackSpec, eps: float, loss: str, restart: int, seed: int,
                       dataset: str, test_indices: list[int], *, with_code: bool = True) -> str:
    """What a surrogate's adversarial examples depend on (and nothing else, so every target reuses them).

    ``with_code=False`` leaves out the evaluation code's fingerprint: the attack's random start is seeded from
    that key, so a change of the code that keeps the numbers (a refactor) keeps them bit for bit, and the
    cache (keyed with the code) is still never reused across code versions (docs/evaluation.md, "Cache keys").
    """
    name = a.name
    params = {"name": name, "eps": eps, "norm": attack_norm(a), "loss": loss, "restart": restart,
              "steps": None if name == "fgsm" else a.steps,
              "alpha": default_alpha(a, eps) if name in ("bim", "mim", "pgd", "pgdl2") else None,
              "momentum": a.momentum if name == "mim" else None, "kappa": a.kappa if loss == "cw" else None,
              "random_start": a.random_start if name in ("pgd", "pgdl2") else None,
              "n_queries": a.n_queries if name == "square" else None,
              "version": a.version if name == "autoattack" else None,
              "c": a.c if name == "cw" else None, "lr": a.lr if name == "cw" else None}
    params.update(vote_temperature=a.vote_temperature, mora_mode=a.mora_mode)
    payload = [surrogate_fingerprint, params, seed, dataset, test_indices, getattr(torchattacks, "__version__", "")]
    if with_code:
        payload.append(evaluation_code_fingerprint())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_save(t: torch.Tensor, path: Path) -> None:
    from ensemble_core.checkpoint import atomic_save

    atomic_save(t, path)


def shard_bounds(plan: EvalPlan, batch_range: tuple[int, int] | None) -> tuple[int, int]:
    batches = plan.batches()
    b0, b1 = batch_range or (0, len(batches))
    return batches[b0][0], batches[b1 - 1][1]


def compute(plan: EvalPlan, *, batch_range: tuple[int, int] | None = None, state_path: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print,
            save_every_s: float = 20.0) -> EvalState:
    """Compute the per-example state for ``batch_range`` (default: every batch), resuming from ``state_path``."""
    lo, hi = shard_bounds(plan, batch_range)
    state = EvalState.load_or_new(state_path, plan.fingerprint, lo, hi, log)
    return _Runner(plan, state, state_path=state_path, cache_dir=cache_dir, progress=progress,
                   should_stop=should_stop, log=log, save_every_s=save_every_s).run(batch_range)
