"""Robustness evaluation of ensembles: attacks, transfer, flags, records, plots, resumable state.

Ray-free; ``workers/ray_eval.py`` shards the same computation across Ray workers. See docs/evaluation.md.
"""

from ensemble_core.evaluation.attacks import build_attack, cw_objective, resolved_params
from ensemble_core.evaluation.evaluate import run_evaluation
from ensemble_core.evaluation.records import summarize, write_artifacts
from ensemble_core.evaluation.runner import (
    EvalModel,
    EvalPlan,
    EvaluationStopped,
    compute,
    load_model,
    prepare_plan,
    protocol_transfer_attacks,
)
from ensemble_core.evaluation.state import EvalState

__all__ = ["EvalModel", "EvalPlan", "EvalState", "EvaluationStopped", "build_attack", "compute", "cw_objective",
           "load_model", "prepare_plan", "protocol_transfer_attacks", "resolved_params", "run_evaluation",
           "summarize", "write_artifacts"]

