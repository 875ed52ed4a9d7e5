"""Run one tune job with Ray Tune: a search over a method's hyperparameters (and the learning rate).

Each trial is a plain Tune function trainable: one process (``cpus_per_trial`` cores, optionally
``gpus_per_trial`` GPUs) running the shared training loop with world size 1 on the trial's train spec
(``TuneSpec.trial_spec``: the base spec, the sampled values, and ``val_size`` held-out training
images). After every epoch the trial reports its metrics and its checkpoint with ``tune.report``, so
ASHA can stop it early and PBT can clone it; the metric it selects on is measured on the held-out
validation images only (clean accuracy, PGD robust accuracy on a fixed validation subset, or a
weighted sum), never on the test split (``sel_*`` metrics are not reported to Tune).

The caller's process gets every change of the trials (``on_trials``: one dict per trial with its
config, Ray status, metric history and best value), may stop the search (``should_stop``: every
trial is stopped and :class:`~workers.errors.JobCancelled` raised), and resumes an interrupted search
with ``Tuner.restore`` from ``(storage_path, job_id)``. At the end the best trial's config, its train
spec and its last checkpoint (``best_trial.pt``, loadable with ``load_ensemble``) are written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import tune

from ensemble_core.spec import SearchDomain, TrainSpec, TuneSpec
from workers.errors import InfrastructureError, JobCancelled, UserError
from workers.ray_common import (
    DriveState,
    LocalEvents,
    describe_validation_error,
    drive,
    ensure_ray,
    torch_threads_for,
)
from workers.tune_analysis import PARETO_PLOT, front_of_trials, param_importance, plot_pareto_front

STATE_FILE = "state.pt"  # the one-file ensemble_core checkpoint inside each Tune checkpoint directory
DEFAULT_ROBUST_EPS = {"mnist": 0.2, "fashion_mnist": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255,
                      "synthetic": 0.1}
TRIAL_MAX_FAILURES = 1  # a trial whose process dies is restarted once from its last checkpoint
# How often Tune snapshots the search's state (trial list, statuses, latest checkpoints): an interrupted
# search resumes from the last snapshot, so keep it recent (a snapshot of a few dozen trials is cheap).
EXPERIMENT_SNAPSHOT_S = "2"

# Keys Tune adds to every result; the rest of a result is what the trial reported.
_TUNE_KEYS = {"time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
              "iterations_since_restore", "training_iteration", "trial_id", "date", "pid", "hostname",
              "node_ip", "config", "done", "experiment_tag", "checkpoint_dir_name", "should_checkpoint",
              "episodes_total", "timesteps_total", "timesteps_since_restore", "episodes_this_iter",
              "timesteps_this_iter", "experiment_id"}


# ----------------------------------------------------------------------------------------------
# Inside a trial process


def robust_val_accuracy(ensemble: Any, ds: Any, *, eps: float, steps: int, n: int, seed: int,
                        device: Any, batch_size: int = 250) -> float:
    """Accuracy of the deployed rule under L∞ PGD (``steps`` steps of eps/4 from a seeded random start).

    PGD ascends the CW margin of the ensemble's attack target (the rule itself or its differentiable
    surrogate; the margin works on logits, probabilities and log-probabilities alike) and the
    examples are scored on the deployed rule, abstentions counting as wrong. ``ds``'s first ``n``
    images are used, so every epoch and every trial is scored on the same images.
    """
    import torch

    from ensemble_core.attacks import margin_loss, pgd_linf
    from ensemble_core.data import iterate_eval

    n = min(n, len(ds))
    subset = ds.subset(torch.arange(n))
    target = ensemble.attack_target()
    was_training = ensemble.training
    ensemble.eval()
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for x, y in iterate_eval(subset, batch_size, device):
        noise = torch.rand(x.shape, generator=g) * 2 - 1
        # kappa = inf: the unclipped margin, so correctly classified points still have a gradient
        x_adv = pgd_linf(lambda z, y=y: margin_loss(target(z), y, kappa=math.inf).sum(), x, eps, eps / 4,
                         steps, noise)
        correct += int((ensemble.predict(x_adv) == y).sum())
    ensemble.train(was_training)
    return correct / max(n, 1)


def _retarget_lr(state: dict[str, Any], new_lr: float) -> None:
    """PBT: a trial cloned from another continues with its own (mutated) learning rate.

    The optimizer state restores the parent's group learning rates; scale every group (and its base
    rate, which the schedule multiplies) by new/old, so per-group multipliers are kept.
    """
    old_lr = json.loads(state["spec"])["optimizer"]["lr"]
    if state.get("optimizer") is None or not old_lr or math.isclose(old_lr, new_lr):
        return
    factor = new_lr / old_lr
    for group in state["optimizer"]["param_groups"]:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def _tune_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One trial: train the trial's spec in this process, reporting metrics and a checkpoint every epoch."""
    import torch

    from ensemble_core.checkpoint import ensemble_from_state, load_checkpoint, save_checkpoint
    from ensemble_core.data import DATASET_INFO, load_dataset, train_val_split
    from ensemble_core.ensemble import Ensemble
    from ensemble_core.methods import get_method
    from ensemble_core.training import TrainHooks, train_ensemble

    torch.set_num_threads(job["threads"])
    ts = TuneSpec.model_validate(job["tune_spec"])
    spec = TrainSpec.model_validate(ts.trial_spec(config))
    device = torch.device("cuda" if job["use_gpu"] and torch.cuda.is_available() else "cpu")

    resume_state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume_state = load_checkpoint(Path(d) / STATE_FILE)
        _retarget_lr(resume_state, spec.optimizer.lr)  # no-op unless PBT changed the lr

    robust = ts.robust
    val = None
    method = None
    if robust is not None:  # the same held-out images the loop validates on (same seeded split)
        info = DATASET_INFO[spec.dataset]
        _, val = train_val_split(load_dataset(spec.dataset, "train", spec.data_dir), spec.val_size,
                                 spec.data_order_seed, spec.train_subset)
        method = get_method(spec.method).from_spec_dict(spec.hyperparameters, members=spec.members,
                                                        num_classes=info.num_classes, dataset=spec.dataset,
                                                        architecture=spec.architecture)
    eps = (robust.eps if robust is not None and robust.eps is not None
           else DEFAULT_ROBUST_EPS.get(spec.dataset, 0.1))

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        assert state is not None  # world size 1: this process is rank 0
        out = {k: v for k, v in metrics.items() if not k.startswith(("sel_", "test_"))}
        if robust is not None and val is not None and method is not None:
            stage = method.stages()[int(metrics["stage"])]
            members = sorted(set(stage.train_members) | set(stage.frozen_members))
            full = ensemble_from_state(state, device=device)
            ens = Ensemble([full.members[i] for i in members], full.combine)
            out["val_robust_acc"] = robust_val_accuracy(ens, val, eps=eps, steps=robust.steps,
                                                        n=robust.n_examples, seed=robust.seed, device=device)
        if ts.objective:
            missing = [k for k in ts.objective if k not in out]
            if missing:
                raise ValueError(f"objective: metric {missing[0]!r} is not reported by this run; reported: "
                                 f"{', '.join(sorted(out))}")
            out["objective"] = sum(w * float(out[k]) for k, w in ts.objective.items())
        with tempfile.TemporaryDirectory(prefix="re-trial-") as d:
            save_checkpoint(state, Path(d) / STATE_FILE)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))

    train_ensemble(spec, device=device, rank=0, world_size=1, resume_state=resume_state,
                   hooks=TrainHooks(on_epoch_end=on_epoch_end, log=lambda line: print(line, flush=True)))


# ----------------------------------------------------------------------------------------------
# In the caller's process

_RUNS: dict[str, dict[str, Any]] = {}  # job id -> {"events": LocalEvents, "stop": bool}


class SearchInterrupted(Exception):
    """Raised inside Tune's control loop to end a search whose caller asked to stop."""


class _TrialEvents(tune.Callback):
    """Forwards trial changes to the caller's thread, and interrupts the search when asked to stop.

    Holds only the job id (Tune pickles its callbacks with the run). The stop is an interrupt, not a
    ``Stopper``: a stopper would mark every trial TERMINATED, while an interrupted search keeps its
    unfinished trials unfinished in the saved experiment state, so ``Tuner.restore`` resumes them (a
    worker that shuts down hands the job back to the queue, and the next attempt must resume).
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._seen: dict[str, str] = {}

    def _push(self, kind: str, payload: Any) -> None:
        run = _RUNS.get(self.job_id)
        if run is not None:
            run["events"].push(kind, payload)

    def _statuses(self, trials: list[Any]) -> None:
        current = {t.trial_id: t.status for t in trials}
        if current != self._seen:
            self._seen = current
            self._push("trials", [{"trial_id": t.trial_id, "status": t.status, "config": dict(t.config)}
                                  for t in trials])

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if _RUNS.get(self.job_id, {}).get("stop"):
            raise SearchInterrupted("stop requested")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._statuses(trials)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS and not isinstance(v, dict)}
        metrics["training_iteration"] = result.get("training_iteration")
        self._push("result", {"trial_id": trial.trial_id, "metrics": metrics})

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._push("error", {"trial_id": trial.trial_id, "error": _trial_error(trial)})

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._statuses(trials)


def _trial_error(trial: Any) -> str:
    try:
        text = Path(trial.error_file).read_text() if getattr(trial, "error_file", None) else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "the trial failed"


def validate_tune_spec(spec: dict[str, Any] | TuneSpec) -> TuneSpec:
    try:
        return spec if isinstance(spec, TuneSpec) else TuneSpec.model_validate(spec)
    except ValidationError as e:
        raise UserError(f"invalid tune spec: {describe_validation_error(e)}") from e


def total_iterations(ts: TuneSpec) -> int:
    """Reports per full trial: one per epoch of every stage (what ASHA's ``max_t`` counts)."""
    from ensemble_core.data import DATASET_INFO
    from ensemble_core.methods import get_method

    base = TrainSpec.model_validate(ts.base)
    method = get_method(base.method).from_spec_dict(base.hyperparameters, members=base.members,
                                                    num_classes=DATASET_INFO[base.dataset].num_classes,
                                                    dataset=base.dataset, architecture=base.architecture)
    return len(method.stages()) * base.epochs


def _domain(d: SearchDomain, as_grid: bool) -> Any:
    if d.type == "grid" or (as_grid and d.type == "choice"):
        return tune.grid_search(list(d.values or []))
    if d.type == "choice":
        return tune.choice(list(d.values or []))
    if d.type == "uniform":
        return tune.uniform(d.low, d.high)
    if d.type == "loguniform":
        return tune.loguniform(d.low, d.high)
    return tune.randint(int(d.low or 0), int(d.high or 0))


def param_space_for(ts: TuneSpec) -> dict[str, Any]:
    return {k: _domain(d, ts.search_alg == "grid") for k, d in ts.search_space.items()}


def search_alg_for(ts: TuneSpec) -> Any:
    """Tune's search algorithm for the spec: a seeded random/grid generator, or Optuna's TPE sampler.

    Optuna is imported only here (a random search needs no optuna). A multi-objective search gives
    Optuna the list of metrics and modes (Tune's own ``metric``/``mode`` stay unset, see
    :func:`tune_metric_mode`). The concurrency limit is the generator's own, or a ``ConcurrencyLimiter``.
    """
    if ts.search_alg != "optuna":
        from ray.tune.search import BasicVariantGenerator

        # the generator itself enforces the concurrency (Tune ignores max_concurrent_trials next to a
        # generator instance)
        return BasicVariantGenerator(random_state=ts.seed, max_concurrent=ts.max_concurrent_trials)
    try:
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise InfrastructureError(f"search_alg 'optuna' needs the optuna package on the worker: {e}") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=ts.seed)
    if ts.metrics:
        metrics, modes = ts.objectives()
        searcher = OptunaSearch(metric=metrics, mode=modes, sampler=sampler)
    else:
        searcher = OptunaSearch(sampler=sampler)  # Tune passes metric and mode
    return ConcurrencyLimiter(searcher, max_concurrent=ts.max_concurrent_trials)


def tune_metric_mode(ts: TuneSpec) -> tuple[str | None, str | None]:
    """TuneConfig's metric and mode: the spec's, or none for a multi-objective search (Optuna has them)."""
    return (None, None) if ts.metrics else (ts.metric, ts.mode)


def scheduler_for(ts: TuneSpec, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if ts.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                             grace_period=min(ts.grace_period, max_t), reduction_factor=ts.reduction_factor)
    if ts.scheduler == "pbt":
        mutations = {k: (list(d.values or []) if d.type in ("choice", "grid") else _domain(d, False))
                     for k, d in ts.search_space.items()}
        return PopulationBasedTraining(time_attr="training_iteration",
                                       perturbation_interval=ts.perturbation_interval,
                                       hyperparam_mutations=mutations)
    return FIFOScheduler()


class _TrialBook:
    """The caller's view of every trial, built from the callback's events."""

    def __init__(self, ts: TuneSpec, total: int) -> None:
        self.ts, self.total = ts, total
        self.trials: dict[str, dict[str, Any]] = {}
        self.dirty = False

    def _get(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.trials:
            self.trials[trial_id] = {
                "trial_id": trial_id, "status": "PENDING", "config": {}, "history": [],
                "metric": self.ts.metric, "mode": self.ts.mode, "best": None, "last": None, "epochs_done": 0,
                "total_epochs": self.total, "progress": 0.0, "stopped_early": False, "cancelled": False,
                "error": None, "first_reported_iteration": None}
        return self.trials[trial_id]

    def handle(self, kind: str, payload: Any, state: DriveState) -> None:
        self.dirty = True
        if kind == "trials":
            for t in payload:
                row = self._get(t["trial_id"])
                row["status"], row["config"] = t["status"], t["config"]
        elif kind == "result":
            row = self._get(payload["trial_id"])
            m = payload["metrics"]
            it = int(m.get("training_iteration") or len(row["history"]) + 1)
            if row["first_reported_iteration"] is None:  # > 1 when the trial continued from a checkpoint
                row["first_reported_iteration"] = it
            self._add(row, m, it)
        elif kind == "restored":  # the history a resumed search had before this call
            for t in payload:
                row = self._get(t["trial_id"])
                row["config"] = t["config"]
                for m in t["history"]:
                    self._add(row, m, int(m["training_iteration"]))
        elif kind == "error":
            row = self._get(payload["trial_id"])
            row["status"], row["error"] = "ERROR", payload["error"]

    def _add(self, row: dict[str, Any], m: dict[str, Any], it: int) -> None:
        """Record iteration ``it``; a restarted trial that reports an iteration again replaces what followed."""
        row["history"] = [h for h in row["history"] if h.get("training_iteration", 0) < it] + [m]
        row["epochs_done"] = it
        row["progress"] = min(it / self.total, 1.0)
        values = [h[self.ts.metric] for h in row["history"] if _finite(h.get(self.ts.metric))]
        row["last"] = values[-1] if values else None
        row["best"] = (max(values) if self.ts.mode == "max" else min(values)) if values else None

    def finish(self, cancelled: bool) -> None:
        for row in self.trials.values():
            unfinished = row["epochs_done"] < self.total
            if cancelled and row["status"] in ("PENDING", "RUNNING", "PAUSED") or (
                    cancelled and row["status"] == "TERMINATED" and unfinished):
                row["status"], row["cancelled"] = "TERMINATED", True
            elif row["status"] == "TERMINATED" and unfinished:
                row["stopped_early"] = True  # the scheduler stopped it
        self.dirty = True

    def snapshot(self) -> list[dict[str, Any]]:
        for row in self.trials.values():
            if row["status"] == "TERMINATED" and row["epochs_done"] < self.total and not row["cancelled"]:
                row["stopped_early"] = True
        return [dict(r) for r in self.trials.values()]


def pick_best(results: list[Any], metric: str, mode: str, total: int) -> Any:
    """The trial with the best last value of ``metric``, among the trials that ran every epoch if any did.

    A trial the scheduler stopped early was judged worse at its last rung, and its checkpoint is a
    partly trained ensemble (for DKD, one whose later members never trained), so it wins only when
    no trial completed. The last value is the one its checkpoint scored.
    """
    scored = [r for r in results if r.metrics and _finite(r.metrics.get(metric))]
    complete = [r for r in scored if int(r.metrics.get("training_iteration") or 0) >= total]
    pool = complete or scored
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r.metrics[metric])


def _restored_history(tuner: Any) -> list[dict[str, Any]]:
    """Every trial's reported metrics so far, from a restored search's stored results."""
    out = []
    for r in tuner.get_results():
        df = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id")
        if df is None or df.empty or not trial_id:
            continue
        history = []
        for rec in df.to_dict("records"):
            m = {k: v for k, v in rec.items() if k not in _TUNE_KEYS and not k.startswith("config/")
                 and not (isinstance(v, float) and math.isnan(v))}
            m["training_iteration"] = int(rec["training_iteration"])
            history.append(m)
        out.append({"trial_id": trial_id, "config": dict(r.config or {}), "history": history})
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def run_tune_job(
    spec: dict[str, Any],
    *,
    job_id: str,
    storage_path: str,
    artifacts_dir: str,
    on_trials: Callable[[list[dict[str, Any]]], None],
    should_stop: Callable[[], bool],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the search of ``spec`` (a :class:`TuneSpec`); write ``best_trial.pt`` and ``tune_results.json``.

    ``on_trials`` gets the list of every trial (``trial_id``, ``status`` as Ray names it: PENDING,
    RUNNING, PAUSED, TERMINATED, ERROR; ``config``, ``history`` of per-epoch metrics, ``best`` and
    ``last`` value of the metric, ``epochs_done``/``total_epochs``, ``progress``, ``stopped_early``,
    ``cancelled``, ``error``, ``first_reported_iteration``) on the caller's thread whenever something
    changed. A resumed search starts from the stored history, so the lists stay complete.
    Returns ``{"metrics", "best", "trials", "checkpoint"}``; ``best["train_spec"]`` is a full train
    spec with the best values (the user's base, its own ``val_size``). A multi-objective search
    (``metrics``) adds ``pareto_front`` (:func:`workers.tune_analysis.front_of_trials`, plotted as
    ``pareto_front.png``) and picks ``best`` among the front's trials; an Optuna search adds
    ``param_importance`` (``{metric: {param: importance}}``, or None with ``param_importance_reason``).
    """
    ts = validate_tune_spec(spec)
    if should_stop():
        raise JobCancelled("cancelled before the search started")
    ensure_ray()
    from workers.warm import make_room

    make_room(ts.cpus_per_trial, ts.gpus_per_trial)  # a trial's: idle warm actors and groups hold cores
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_SNAPSHOT_S)  # read by Tune's controller
    out_dir = Path(artifacts_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = total_iterations(ts)
    use_gpu = ts.gpus_per_trial > 0
    job = {"tune_spec": ts.resolved(), "threads": torch_threads_for(ts.cpus_per_trial), "use_gpu": use_gpu}
    resources = {"cpu": ts.cpus_per_trial, "gpu": ts.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, job=job), resources)
    book = _TrialBook(ts, total)
    events = LocalEvents()
    _RUNS[str(job_id)] = {"events": events, "stop": False}
    experiment = Path(storage_path) / str(job_id)
    t0 = time.monotonic()
    try:
        if tune.Tuner.can_restore(str(experiment)):
            log(f"resuming the search from {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            try:
                events.push("restored", _restored_history(tuner))
            except Exception as e:  # noqa: BLE001 - the history is a convenience; the search goes on
                log(f"could not read the earlier trial results: {type(e).__name__}: {e}")
        else:
            metrics, modes = ts.objectives()
            log(f"starting a {ts.scheduler} {ts.search_alg} search of {ts.base['method']} over "
                f"{', '.join(ts.search_space)}: {total} epoch(s) per trial, "
                + (f"metric {ts.metric} ({ts.mode})" if not ts.metrics else
                   "objectives " + ", ".join(f"{m} ({d})" for m, d in zip(metrics, modes, strict=True))))
            metric, mode = tune_metric_mode(ts)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space_for(ts),
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, scheduler=scheduler_for(ts, total), search_alg=search_alg_for(ts),
                    num_samples=1 if ts.search_alg == "grid" else ts.num_samples),
                run_config=tune.RunConfig(
                    name=str(job_id), storage_path=str(storage_path), callbacks=[_TrialEvents(str(job_id))],
                    verbose=0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES)),
            )

        def flush() -> None:
            if book.dirty:
                book.dirty = False
                on_trials(book.snapshot())

        def request_stop(reason: str) -> None:
            _RUNS[str(job_id)]["stop"] = True

        grid, error, dstate = drive(tuner.fit, drain=events.drain, handle=book.handle, flush=flush,
                                    should_stop=should_stop, request_stop=request_stop, log=log)
    finally:
        _RUNS.pop(str(job_id), None)

    cancelled = dstate.stop_reason == "cancel"
    book.finish(cancelled)
    on_trials(book.snapshot())
    if cancelled:
        raise JobCancelled(f"search cancelled after {time.monotonic() - t0:.1f} s; every trial was stopped")
    if error is not None:
        raise InfrastructureError(f"Ray Tune failed: {type(error).__name__}: {error}") from error
    if grid is None:
        raise InfrastructureError("the search did not finish")
    results = list(grid)
    front = None
    if ts.metrics:  # the best trial is the front's best on ts.metric
        front = front_of_trials(book.snapshot(), *ts.objectives(), total)
        on_front = {t["trial_id"] for t in front["trials"]}
        results = [r for r in results if str((r.metrics or {}).get("trial_id")) in on_front] or results
    best = pick_best(results, ts.metric, ts.mode, total)
    if best is None:
        errors = [row["error"] for row in book.trials.values() if row["error"]]
        # the trials ran and failed (their own errors): a transient failure, charged to max_attempts
        raise RuntimeError(f"no trial reported {ts.metric}" + (f": {errors[0]}" if errors else ""))
    best_id = str(best.metrics.get("trial_id"))
    best_config = {k: best.config[k] for k in ts.search_space if k in best.config}
    checkpoint_name = None
    if best.checkpoint is not None:
        with best.checkpoint.as_directory() as d:
            tmp = out_dir / ".best_trial.pt.tmp"
            shutil.copyfile(Path(d) / STATE_FILE, tmp)
            tmp.replace(out_dir / "best_trial.pt")
        checkpoint_name = "best_trial.pt"
    trials = book.snapshot()
    keys = ("trial_id", "status", "config", "best", "last", "epochs_done", "stopped_early", "cancelled",
            "error")
    summary = [{k: t[k] for k in keys} for t in trials]
    best_out = {"trial_id": best_id, "config": best_config, "metric": ts.metric, "mode": ts.mode,
                "value": best.metrics.get(ts.metric), "epochs_done": best.metrics.get("training_iteration"),
                "checkpoint": checkpoint_name, "train_spec": ts.best_train_spec(best_config)}
    metrics = {f"best_{ts.metric}": best.metrics.get(ts.metric), "trials": len(trials),
               "trials_stopped_early": sum(1 for t in trials if t["stopped_early"]),
               "trials_failed": sum(1 for t in trials if t["status"] == "ERROR")}
    extra = _search_summary(ts, trials, front, total, out_dir, log)
    if front is not None:
        metrics["pareto_front_size"] = len(front["trials"])
    record = {"metrics": metrics, "best": best_out, "trials": trials, "tune_spec": ts.resolved(),
              "wall_time_s": time.monotonic() - t0, **extra}
    (out_dir / "tune_results.json").write_text(json.dumps(record, indent=2, default=str))
    log(f"search finished in {time.monotonic() - t0:.1f} s: best {ts.metric} {best_out['value']} with "
        f"{best_config} ({metrics['trials_stopped_early']} of {len(trials)} trials stopped early)"
        + (f"; Pareto front of {len(front['trials'])} trial(s)" if front is not None else ""))
    return {"metrics": metrics, "best": best_out, "trials": summary, "checkpoint": checkpoint_name, **extra}


def _search_summary(ts: TuneSpec, trials: list[dict[str, Any]], front: dict[str, Any] | None, total: int,
                    out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The Pareto front (multi-objective; plotted as ``pareto_front.png``) and Optuna's parameter
    importance (Optuna searches), for the job's result."""
    out: dict[str, Any] = {}
    if front is not None:
        try:
            plot_pareto_front(trials, front, out_dir / PARETO_PLOT)
            front = {**front, "plot": PARETO_PLOT}
        except Exception as e:  # noqa: BLE001 - the plot is a convenience; the front is in the result
            log(f"could not plot the Pareto front: {type(e).__name__}: {e}")
            front = {**front, "plot": None}
        out["pareto_front"] = front
    if ts.search_alg == "optuna":
        imp = param_importance(trials, ts.search_space, *ts.objectives(), total)
        if imp["param_importance"] is None:
            log(f"no parameter importance: {imp['param_importance_reason']}")
        out.update(imp)
    return out


__all__ = ["param_space_for", "pick_best", "robust_val_accuracy", "run_tune_job", "scheduler_for",
           "search_alg_for", "total_iterations", "tune_metric_mode", "validate_tune_spec"]
