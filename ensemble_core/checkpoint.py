"""One-file checkpoints: members' weights, auxiliary modules, optimizer state, progress and the spec.

Files are read with ``torch.load(weights_only=True)`` only: everything stored is tensors, numbers,
strings, lists and dicts (the spec, architecture and history travel as JSON strings).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ensemble_core.ensemble import Ensemble
from ensemble_core.models import MemberNet, build_model, place

FORMAT = "robust-ensembles/checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint ``state`` atomically (see :func:`atomic_save`)."""
    return atomic_save(state, path)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) and check its format.

    A directory holding an ensemble in the Hugging Face layout (a registered model: ``config.json`` and
    ``model.safetensors``, :mod:`ensemble_core.registry_io`) reads as the same checkpoint state, without pickle.
    """
    from ensemble_core import registry_io

    if registry_io.is_folder(path):
        return registry_io.checkpoint_state_from_folder(path)
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a robust-ensembles checkpoint")
    return state


def checkpoint_spec(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(state["spec"])


def build_member(arch: dict[str, Any]) -> MemberNet:
    return build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       image_size=arch["image_size"], mean=tuple(arch["mean"]), std=tuple(arch["std"]),
                       **arch.get("kwargs", {}))


def ensemble_from_state(state: dict[str, Any], combine: str | None = None,
                        device: str | torch.device = "cpu") -> Ensemble:
    import ensemble_core.methods as methods

    methods.method_names()  # registers method-specific combine rules (e.g. DKD's boosted vote)
    arch = json.loads(state["arch"])
    members = []
    for sd in state["members"]:
        m = build_member(arch)
        m.load_state_dict(sd)
        members.append(m)
    ens = place(Ensemble(members, combine or state["combine"]), device)
    ens.eval()
    for p in ens.parameters():
        p.requires_grad_(False)
    return ens


def load_ensemble(path: str | Path, combine: str | None = None, device: str | torch.device = "cpu") -> Ensemble:
    """Load a checkpoint file as a ready :class:`Ensemble` in eval mode (deployed rule unless ``combine``)."""
    return ensemble_from_state(load_checkpoint(path, map_location=device), combine=combine, device=device)
