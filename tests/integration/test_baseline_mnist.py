"""A 3-member LeNet-5 baseline trained on real MNIST reaches at least 97% clean test accuracy."""

from pathlib import Path

import pytest

from ensemble_core.checkpoint import load_ensemble
from ensemble_core.data import load_dataset, test_subset
from ensemble_core.training import clean_accuracy, train_local

pytestmark = pytest.mark.integration


def test_baseline_lenet5_reaches_97_percent_on_real_mnist(tmp_path: Path) -> None:
    spec = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": 2,
            "batch_size": 128, "optimizer": {"name": "adam", "lr": 1e-3}, "train_subset": 20_000,
            "eval_subset": 2000, "seed": 0}
    result, path = train_local(spec, tmp_path, progress=False, log=lambda s: None)
    assert result.metrics["test_clean_acc"] >= 0.97, result.metrics
    # the file on disk scores the same on the PROTOCOL report subset (2,000 images, seed 0 slice)
    report = test_subset(load_dataset("mnist", "test"), "report", n=2000)
    assert clean_accuracy(load_ensemble(path), report)["acc"] == result.metrics["test_clean_acc"]
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
