"""ensemble_core: the pure library (torch + torchattacks; no web, SQL or Ray).

Data, models, ensembles, methods, the training loop, attacks, reports and checkpoint files —
everything a researcher needs in a notebook. Importing this package does not import torch; the
names below load their modules on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TrainSpec": "ensemble_core.spec",
    "EvaluateSpec": "ensemble_core.spec",
    "TuneSpec": "ensemble_core.spec",
    "Ensemble": "ensemble_core.ensemble",
    "build_model": "ensemble_core.models",
    "load_dataset": "ensemble_core.data",
    "load_ensemble": "ensemble_core.checkpoint",
    "load_checkpoint": "ensemble_core.checkpoint",
    "train_ensemble": "ensemble_core.training",
    "train_local": "ensemble_core.training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ensemble_core' has no attribute {name!r}")


__all__ = sorted(_LAZY)
