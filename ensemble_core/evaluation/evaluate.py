"""``run_evaluation``: an evaluation from its spec to its results, in one call (docs/evaluation.md).

It composes the two halves, which do not import each other: :mod:`ensemble_core.evaluation.runner` plans and
computes the per-example outcomes (resumable, shardable: ``workers/ray_eval.py`` runs shards of the same
computation), :mod:`ensemble_core.evaluation.records` turns them into records, flags and plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ensemble_core.data import TensorDataset
from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation.records import summarize, write_artifacts
from ensemble_core.evaluation.runner import ProgressFn, compute, prepare_plan
from ensemble_core.spec import EvaluateSpec


def run_evaluation(spec: EvaluateSpec | dict[str, Any], target: Ensemble | str | Path, *,
                   baseline: Ensemble | str | Path | None = None,
                   surrogates: Sequence[Ensemble | str | Path] | dict[str, Any] = (),
                   out_dir: str | Path | None = None, state_path: str | Path | None = None,
                   cache_dir: str | Path | None = None, dataset: str | None = None, data_dir: str | None = None,
                   device: torch.device | str | None = None, progress: ProgressFn | None = None,
                   should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print,
                   plots: bool = True, test_set: TensorDataset | None = None,
                   surrogate_groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate ``target`` (and ``baseline``) under ``spec``; returns the results dict.

    With ``out_dir``, writes ``results.json`` and the PNG plots there, and keeps the resumable state in
    ``out_dir/eval_state.json`` unless ``state_path`` says otherwise. ``test_set`` replaces the data set's
    test split (the PROTOCOL subsets are then taken from it).
    """
    t0 = time.perf_counter()
    plan = prepare_plan(spec, target, baseline=baseline, surrogates=surrogates, dataset=dataset,
                        data_dir=data_dir, device=device, test_set=test_set, surrogate_groups=surrogate_groups)
    if state_path is None and out_dir is not None:
        state_path = Path(out_dir) / "eval_state.json"
    state = compute(plan, state_path=state_path, cache_dir=cache_dir, progress=progress,
                    should_stop=should_stop, log=log)
    result = summarize(plan, state, wall_time_s=time.perf_counter() - t0)
    if out_dir is not None:
        write_artifacts(result, out_dir, plots=plots)
    return result
