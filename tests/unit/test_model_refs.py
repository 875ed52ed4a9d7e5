"""Evaluate specs naming registered models, and how the worker finds their folders (no database)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from ensemble_core.spec import EvaluateSpec
from service.settings import Settings
from workers.errors import UserError
from workers.worker import resolve_checkpoints


def test_exactly_one_target_and_one_source_per_role() -> None:
    mid = str(uuid.uuid4())
    spec = EvaluateSpec.model_validate({"target_model": mid, "transfer_from_model": mid, "baseline_model": mid})
    assert spec.target_model == mid and spec.resolved()["transfer_from_model"] == mid
    for bad, message in (({"target_model": mid, "target_job": mid}, "exactly one of target_job, target_checkpoint"),
                         ({}, "exactly one of"),
                         ({"target_model": mid, "transfer_from_model": mid, "transfer_from_job": mid},
                          "transfer_from_model: give one of transfer_from_job"),
                         ({"target_model": mid, "baseline_model": mid, "baseline_checkpoint": "/x.pt"},
                          "baseline_model: give one of")):
        with pytest.raises(ValidationError, match=message):
            EvaluateSpec.model_validate(bad)


def test_the_worker_resolves_models_to_their_folders_and_names_a_missing_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    present, gone = str(uuid.uuid4()), str(uuid.uuid4())
    folder = settings.models_root / present
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    out = resolve_checkpoints({"target_model": present, "transfer_from_model": present}, settings)
    assert out == {"target": str(folder), "surrogate": str(folder), "baseline": None}
    with pytest.raises(UserError, match=f"baseline_model: no registered model {gone}"):
        resolve_checkpoints({"target_model": present, "baseline_model": gone}, settings)
    assert Settings(data_dir=tmp_path, models_dir=tmp_path / "elsewhere").models_root == tmp_path / "elsewhere"
