"""Checks every registered method passes, whoever wrote it: schema, defaults, stages and exact resume."""

from pathlib import Path

import pytest
import torch

from ensemble_core.methods import describe_methods, get_method, method_names
from ensemble_core.spec import TrainSpec
from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble, train_local


def test_registry_has_the_baseline() -> None:
    assert "baseline" in method_names()


@pytest.mark.parametrize("name", method_names())
def test_method_describes_every_hyperparameter(name: str) -> None:
    d = next(m for m in describe_methods() if m["name"] == name)
    assert d["summary"] and d["title"]
    for field, info in d["hyperparameters"].items():
        assert info["description"], f"{name}.{field} has no meaning"
    # the defaults validate, and the resolved spec records them
    spec = TrainSpec.model_validate({"method": name, "members": max(3, get_method(name).min_members)})
    assert set(spec.hyperparameters) == set(d["hyperparameters"])


def _tiny(name: str) -> dict:
    members = max(2, get_method(name).min_members)
    return {"method": name, "dataset": "synthetic", "members": members, "epochs": 2, "batch_size": 32,
            "train_subset": 96, "eval_subset": 64, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 3}


# the adversarially trained methods take ~12 s each here: `make test-fast` leaves them to `make test`
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("cce", "adv_en") else n
                                  for n in method_names()])
def test_interrupted_run_resumes_to_the_same_weights(name: str, tmp_path: Path) -> None:
    """Stop after the first epoch, resume from the checkpoint: bit-identical to an uninterrupted run."""
    spec = _tiny(name)
    full, _ = train_local(spec, tmp_path / "full", progress=False, log=lambda s: None)
    saved: list[dict] = []

    def keep(metrics: dict, state: dict | None) -> None:
        saved.append(state)

    with pytest.raises(TrainingStopped):
        train_ensemble(spec, hooks=TrainHooks(on_epoch_end=keep, should_stop=lambda: bool(saved), log=lambda s: None))
    resumed = train_ensemble(spec, resume_state=saved[-1], hooks=TrainHooks(log=lambda s: None))
    assert len(resumed.history) == len(full.history)
    for a, b in zip(full.state["members"], resumed.state["members"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    for n in full.state["aux"]:
        for k in full.state["aux"][n]:
            assert torch.equal(full.state["aux"][n][k], resumed.state["aux"][n][k])
