"""What a finished search's trials say beyond its best trial: the Pareto front and parameter importance.

- :func:`pareto_front`: the non-dominated points of a list of metric vectors (pure Python).
- :func:`front_of_trials`: the Pareto front of a tune job's trials on their last reported values.
- :func:`plot_pareto_front`: a PNG of every trial with the front highlighted and connected.
- :func:`param_importance`: Optuna's parameter importance (PED-ANOVA, Optuna's default evaluator) of
  each objective, on a study rebuilt from the finished trials.

Nothing here imports Ray; Optuna and matplotlib are imported when used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble_core.spec import SearchDomain

PARETO_PLOT = "pareto_front.png"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every metric and better on one (``modes``: 'max'/'min' each)."""
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    Equal points do not dominate each other, so duplicates on the front are all kept; a point that ties
    another on one metric and is worse on another is dominated. O(n²), for a search's few hundred trials.
    """
    if any(m not in ("max", "min") for m in modes):
        raise ValueError(f"modes must be 'max' or 'min', got {list(modes)}")
    for p in points:
        if len(p) != len(modes):
            raise ValueError(f"every point needs {len(modes)} values, got {list(p)}")
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, modes) for j, q in enumerate(points) if j != i)]


def last_values(trial: dict[str, Any], metrics: Sequence[str]) -> dict[str, float] | None:
    """A trial's last reported value of each metric (its last epoch's report), or None if one is missing."""
    history = trial.get("history") or []
    if not history:
        return None
    last = history[-1]
    values = {m: last.get(m) for m in metrics}
    return {m: float(v) for m, v in values.items()} if all(_finite(v) for v in values.values()) else None


def scored_trials(trials: Sequence[dict[str, Any]], metrics: Sequence[str], total: int
                  ) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """The trials a front or an importance is computed on, with their last values: those that ran every
    epoch (``epochs_done >= total``) if any did, else every trial that reported all the metrics (as
    ``workers.ray_tune.pick_best`` chooses)."""
    scored = [(t, v) for t in trials if (v := last_values(t, metrics)) is not None]
    complete = [(t, v) for t, v in scored if int(t.get("epochs_done") or 0) >= total]
    return complete or scored


def front_of_trials(trials: Sequence[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str],
                    total: int) -> dict[str, Any]:
    """The Pareto front of the trials (the ``_TrialBook`` rows of ``workers.ray_tune``) on ``metrics``.

    Returns ``{"metrics", "modes", "trials": [{"trial_id", "config", "values", "epochs_done"}] sorted by
    the first metric (best first), "candidates": trials compared, "excluded": ids left out (a metric
    missing, or unfinished while others finished)}``.
    """
    pool = scored_trials(trials, metrics, total)
    idx = pareto_front([[v[m] for m in metrics] for _, v in pool], modes)
    sign = -1.0 if modes[0] == "max" else 1.0
    front = sorted((pool[i] for i in idx), key=lambda tv: (sign * tv[1][metrics[0]], str(tv[0]["trial_id"])))
    used = {str(t["trial_id"]) for t, _ in pool}
    return {
        "metrics": list(metrics), "modes": list(modes),
        "trials": [{"trial_id": str(t["trial_id"]), "config": dict(t.get("config") or {}), "values": v,
                    "epochs_done": t.get("epochs_done")} for t, v in front],
        "candidates": len(pool),
        "excluded": sorted(str(t["trial_id"]) for t in trials if str(t["trial_id"]) not in used),
    }


def plot_pareto_front(trials: Sequence[dict[str, Any]], front: dict[str, Any], path: str | Path) -> Path:
    """Scatter of every scored trial on the first two metrics, the front's trials highlighted and joined
    (in the order of the first metric). With more than two metrics the front is on all of them, so the
    highlighted points need not look non-dominated in the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = front["metrics"]
    mx, my = metrics[0], metrics[1]
    on_front = {t["trial_id"] for t in front["trials"]}
    pts = [(str(t["trial_id"]), v) for t in trials if (v := last_values(t, metrics)) is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    others = [v for tid, v in pts if tid not in on_front]
    ax.scatter([v[mx] for v in others], [v[my] for v in others], c="0.6", s=28, label="trials")
    fx = [t["values"][mx] for t in front["trials"]]
    fy = [t["values"][my] for t in front["trials"]]
    order = sorted(range(len(fx)), key=lambda i: (fx[i], fy[i]))
    ax.plot([fx[i] for i in order], [fy[i] for i in order], "-", c="tab:red", lw=1.2, zorder=2)
    ax.scatter(fx, fy, c="tab:red", s=44, zorder=3, label=f"Pareto front ({len(fx)})")
    ax.set_xlabel(f"{mx} ({front['modes'][0]})")
    ax.set_ylabel(f"{my} ({front['modes'][1]})")
    title = "Pareto front of the search"
    if len(metrics) > 2:
        title += f" (on {', '.join(metrics)})"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def _distribution(d: SearchDomain) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if d.type in ("choice", "grid"):
        return CategoricalDistribution(list(d.values or []))
    if d.type == "randint":  # high is exclusive, as in Tune
        return IntDistribution(int(d.low or 0), int(d.high or 0) - 1)
    return FloatDistribution(float(d.low or 0.0), float(d.high or 0.0), log=d.type == "loguniform")


def param_importance(trials: Sequence[dict[str, Any]], search_space: dict[str, SearchDomain],
                     metrics: Sequence[str], modes: Sequence[str], total: int) -> dict[str, Any]:
    """Optuna's importance of each searched parameter for each objective.

    The study is rebuilt from the trials :func:`scored_trials` picks (their last values) and each
    objective is evaluated with ``get_param_importances(target=...)`` and Optuna's default evaluator
    (PED-ANOVA; the target is negated for 'max' metrics, as it ranks parameters by how they reach low
    values). Only parameters that took more than one value are evaluated.

    Returns ``{"param_importance": {metric: {param: value}} | None, "param_importance_reason": str | None,
    "param_importance_notes": [Optuna's warnings], "param_importance_trials": n}``.
    """
    pool = scored_trials(trials, metrics, total)
    out: dict[str, Any] = {"param_importance": None, "param_importance_reason": None,
                           "param_importance_notes": [], "param_importance_trials": len(pool)}
    if len(pool) < 2:
        out["param_importance_reason"] = (f"{len(pool)} trial(s) reported {', '.join(metrics)}; importance "
                                          f"needs at least 2")
        return out
    keys = [k for k in search_space
            if len({repr(t.get("config", {}).get(k)) for t, _ in pool}) > 1]
    if not keys:
        out["param_importance_reason"] = "no searched parameter took more than one value in the trials"
        return out
    try:
        import optuna
        from optuna.trial import create_trial
    except ImportError as e:
        out["param_importance_reason"] = f"optuna is not installed: {e}"
        return out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        dists = {k: _distribution(search_space[k]) for k in search_space}
        study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes])
        for t, values in pool:
            config = t.get("config") or {}
            params = {k: config[k] for k in search_space if k in config}
            study.add_trial(create_trial(params=params, distributions={k: dists[k] for k in params},
                                         values=[values[m] for m in metrics]))
        result: dict[str, dict[str, float]] = {}
        notes: list[str] = []
        for i, (metric, mode) in enumerate(zip(metrics, modes, strict=True)):
            sign = -1.0 if mode == "max" else 1.0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                imp = optuna.importance.get_param_importances(
                    study, params=keys, target=lambda ft, i=i, sign=sign: sign * ft.values[i])
            notes += [str(w.message) for w in caught if "computes the importances of params to achieve low"
                      not in str(w.message)]  # the negated target takes care of that one
            result[metric] = {k: float(v) for k, v in imp.items()}
    except Exception as e:  # noqa: BLE001 - importance is a summary; the search itself succeeded
        out["param_importance_reason"] = f"Optuna could not compute it: {type(e).__name__}: {e}"
        return out
    out["param_importance"] = result
    out["param_importance_notes"] = sorted(set(notes))
    return out


__all__ = ["PARETO_PLOT", "dominates", "front_of_trials", "last_values", "param_importance", "pareto_front",
           "plot_pareto_front", "scored_trials"]
