"""Checkpoint round trip: same predictions after load, safe loading, resume equals an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch

from ensemble_core.checkpoint import ensemble_from_state, load_checkpoint, load_ensemble, save_checkpoint
from ensemble_core.data import load_dataset
from ensemble_core.spec import TrainSpec
from ensemble_core.training import TrainHooks, TrainingStopped, train_ensemble, train_local

SPEC = {"method": "baseline", "dataset": "synthetic", "members": 2, "epochs": 3, "batch_size": 64,
        "eval_subset": 200, "optimizer": {"name": "sgd", "lr": 0.05}}


@pytest.mark.slow
def test_round_trip_gives_the_same_predictions(tmp_path: Path) -> None:
    result, path = train_local(SPEC, tmp_path, progress=False, log=lambda s: None)
    state = load_checkpoint(path)
    assert json.loads(state["spec"])["members"] == 2 and state["progress"]["finished"]
    ens = load_ensemble(path)
    assert not ens.training and ens.combine == "mean_logits"
    x, _ = load_dataset("synthetic", "test").as_float()
    in_memory = ensemble_from_state(result.state)  # the trained weights, before any file
    with torch.no_grad():
        assert torch.equal(ens(x), in_memory(x))
        assert torch.equal(ens.predict(x), in_memory.predict(x))
        ens2 = load_ensemble(path, combine="vote")
        assert torch.equal(ens2.member_logits(x), ens.member_logits(x)) and ens2.combine == "vote"
    assert result.metrics["test_clean_acc"] > 0.5  # the synthetic classes are learnable


def test_loading_refuses_pickled_objects_and_foreign_files(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    torch.save({"format": "robust-ensembles/checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "evil.pt")
    save_checkpoint({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a robust-ensembles checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    full, _ = train_local(SPEC, tmp_path / "a", progress=False, log=lambda s: None)
    # interrupt after the first epoch (the loop checks should_stop at every epoch end)
    epochs_seen = []

    def stop_after_first(metrics: dict, state: dict | None) -> None:
        epochs_seen.append(metrics["epoch"])
        save_checkpoint(state, tmp_path / "b" / "checkpoint.pt")

    with pytest.raises(TrainingStopped):
        train_ensemble(SPEC, hooks=TrainHooks(on_epoch_end=stop_after_first, should_stop=lambda: bool(epochs_seen),
                                              log=lambda s: None))
    assert epochs_seen == [1]
    logs: list[str] = []
    resumed, _ = train_local(SPEC, tmp_path / "b", progress=False, log=logs.append)
    assert any("resuming at stage 1/1, epoch 2/3" in s for s in logs)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.state["members"], resumed.state["members"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k  # bit-identical: every random draw is keyed by (seed, epoch, step)


def test_spec_is_stored_resolved(tmp_path: Path) -> None:
    _, path = train_local({**SPEC, "epochs": 1}, tmp_path, progress=False, log=lambda s: None)
    stored = json.loads(load_checkpoint(path)["spec"])
    assert stored == TrainSpec.model_validate({**SPEC, "epochs": 1}).resolved()
