"""The job specs: defaults, validation errors that name the field, and no torch at import."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from ensemble_core.spec import EvaluateSpec, TrainSpec, TuneSpec


def locs(err: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in err.errors()]


def test_issue_example_spec_is_valid_and_resolved() -> None:
    spec = TrainSpec.model_validate({
        "method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": 2,
        "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
        "hyperparameters": {}, "train_subset": 10000, "seed": 0, "workers": 2, "use_gpu": False})
    r = spec.resolved()
    assert r["hyperparameters"] == {"label_smoothing": 0.0}  # the method's defaults are filled in
    assert r["schedule"]["name"] == "constant" and r["workers"] == 2


@pytest.mark.parametrize("patch, where", [
    ({"members": 0}, "members"),
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 10**6}, "batch_size"),
    ({"optimizer": {"name": "adam", "lr": -1}}, "optimizer.lr"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"architecture": "vgg99"}, "architecture"),
    ({"method": "nope"}, "method"),
    ({"hyperparameters": {"label_smoothing": 2.0}}, "hyperparameters.label_smoothing"),
    ({"hyperparameters": {"typo": 1}}, "hyperparameters.typo"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"combine": "median"}, "combine"),
])
def test_invalid_values_name_the_field(patch: dict, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate({"method": "baseline", **patch})
    assert where in locs(e.value) or any(where in str(x["msg"]) for x in e.value.errors())


def test_dataset_aliases() -> None:
    assert TrainSpec.model_validate({"dataset": "Fashion-MNIST"}).dataset == "fashion_mnist"


def test_evaluate_needs_exactly_one_target() -> None:
    with pytest.raises(ValidationError):
        EvaluateSpec.model_validate({})
    with pytest.raises(ValidationError):
        EvaluateSpec.model_validate({"target_job": "a", "target_checkpoint": "b"})
    assert EvaluateSpec.model_validate({"target_job": "a"}).attacks[0].name == "pgd"


def test_tune_domains_are_checked() -> None:
    with pytest.raises(ValidationError) as e:
        TuneSpec.model_validate({"base": {}, "search_space": {"optimizer.lr": {"type": "loguniform", "low": 0,
                                                                               "high": 1}}})
    assert "search_space.optimizer.lr" in locs(e.value)


def test_spec_import_does_not_load_torch() -> None:
    code = "import sys, ensemble_core, ensemble_core.spec; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_omitted_hyperparameters_resolve_to_the_method_defaults() -> None:
    assert TrainSpec.model_validate({"method": "baseline"}).resolved()["hyperparameters"] == {"label_smoothing": 0.0}
