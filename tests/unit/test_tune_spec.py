"""TuneSpec validation (search space against the method's schema, metric rules) and the pieces of the
Tune runner that need no Ray cluster: trial specs, PBT's learning-rate hand-over, the cheap robust
metric on a hand-computable model, the trial book, param spaces and schedulers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ensemble_core.spec import TuneSpec, apply_tune_config, tune_target

DKD = {"method": "dkd", "members": 2, "epochs": 2, "train_subset": 1000}


def errors(spec: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        TuneSpec.model_validate(spec)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in info.value.errors()}


def test_search_space_keys_are_the_methods_hyperparameters_and_lr() -> None:
    ts = TuneSpec.model_validate({"base": DKD, "search_space": {
        "zeta": {"type": "uniform", "low": 0.1, "high": 0.9},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "hyperparameters.top_n": {"type": "choice", "values": [2, 3]}}})
    assert set(ts.search_space) == {"zeta", "lr", "hyperparameters.top_n"}
    assert ts.base["hyperparameters"]["zeta"] is None  # the base is stored resolved
    assert tune_target("optimizer.lr") == ("optimizer", "lr")
    assert tune_target("hyperparameters.zeta") == ("hyperparameters", "zeta")


def test_a_bad_search_key_or_value_is_named_by_its_location() -> None:
    errs = errors({"base": DKD, "search_space": {"zeta": {"type": "uniform", "low": 0.2, "high": 1.5},
                                                   "gamma": {"type": "choice", "values": [1]}}})
    assert set(errs) == {"search_space.zeta", "search_space.gamma"}
    assert "1.5" in errs["search_space.zeta"] and "less than" in errs["search_space.zeta"]
    assert "no hyperparameter 'gamma'" in errs["search_space.gamma"] and "zeta" in errs["search_space.gamma"]
    cldl = {"method": "cldl", "members": 2}
    errs = errors({"base": cldl, "search_space": {"beta": {"type": "grid", "values": [0.5, -1.0]}}})
    assert list(errs) == ["search_space.beta"] and "-1.0" in errs["search_space.beta"]
    # an integer hyperparameter cannot take a real-valued range
    k_range = {"K": {"type": "uniform", "low": 1, "high": 2}}
    errs = errors({"base": {"method": "parl", "members": 2}, "search_space": k_range})
    assert "use choice, grid or randint" in errs["search_space.K"]
    errs = errors({"base": DKD, "search_space": {"lr": {"type": "uniform", "low": 0.1, "high": 20}}})
    assert "search_space.lr" in errs
    assert "search_space" in errors({"base": DKD, "search_space": {}})
    assert "base.members" in errors({"base": {**DKD, "members": 0}, "search_space": {"lr": {
        "type": "choice", "values": [0.1]}}})


def test_the_metric_never_comes_from_the_test_split() -> None:
    space = {"zeta": {"type": "choice", "values": [0.5]}}
    for bad in ("sel_clean_acc", "test_clean_acc"):
        msg = " ".join(errors({"base": DKD, "search_space": space, "metric": bad}).values())
        assert "test split" in msg
    def msg_of(metric: str) -> str:
        return " ".join(errors({"base": DKD, "search_space": space, "metric": metric}).values())

    assert "unknown metric" in msg_of("acc")
    assert "needs weights" in msg_of("objective")
    msg = " ".join(errors({"base": DKD, "search_space": space, "metric": "objective",
                           "objective": {"sel_clean_acc": 1.0}}).values())
    assert "test split" in msg
    ts = TuneSpec.model_validate({"base": DKD, "search_space": space, "metric": "val_robust_acc"})
    assert ts.robust is not None and ts.robust.steps == 10  # selecting on robustness turns the attack on
    ts = TuneSpec.model_validate({"base": DKD, "search_space": space, "metric": "objective",
                                  "objective": {"val_clean_acc": 0.5, "val_robust_acc": 0.5}})
    assert ts.robust is not None
    assert TuneSpec.model_validate({"base": DKD, "search_space": space, "metric": "train_loss",
                                    "mode": "min"}).metric == "train_loss"


def test_grid_search_needs_listed_values_and_val_size_must_fit() -> None:
    msg = " ".join(errors({"base": DKD, "search_alg": "grid",
                           "search_space": {"zeta": {"type": "uniform", "low": 0.1, "high": 0.9}}}).values())
    assert "search_alg" in msg and "zeta" in msg
    msg = " ".join(errors({"base": {**DKD, "dataset": "synthetic"},
                           "search_space": {"zeta": {"type": "choice", "values": [0.5]}}}).values())
    assert "val_size" in msg and "2048" in msg


def test_trial_spec_and_best_train_spec_put_values_in_place() -> None:
    ts = TuneSpec.model_validate({"base": {**DKD, "val_size": 0}, "val_size": 3000, "search_space": {
        "zeta": {"type": "choice", "values": [0.5]}, "optimizer.lr": {"type": "choice", "values": [0.01]}}})
    trial = ts.trial_spec({"zeta": 0.25, "optimizer.lr": 0.02})
    assert trial["hyperparameters"]["zeta"] == 0.25 and trial["optimizer"]["lr"] == 0.02
    assert trial["val_size"] == 3000  # trials always hold out validation images
    full = ts.best_train_spec({"zeta": 0.25, "optimizer.lr": 0.02})
    assert full["val_size"] == 0 and full["hyperparameters"]["zeta"] == 0.25
    assert full["optimizer"]["lr"] == 0.02
    assert full["optimizer"]["name"] == ts.base["optimizer"]["name"]
    assert ts.base["hyperparameters"]["zeta"] is None  # the base itself is untouched
    assert apply_tune_config({"optimizer": {"lr": 1.0, "name": "sgd"}}, {"lr": 0.5}) == {
        "optimizer": {"lr": 0.5, "name": "sgd"}}


def test_pbt_hands_the_mutated_learning_rate_to_every_group() -> None:
    import json

    from workers.ray_tune import _retarget_lr

    state = {"spec": json.dumps({"optimizer": {"lr": 0.1}}), "optimizer": {"state": {}, "param_groups": [
        {"lr": 0.05, "initial_lr": 0.1, "params": [0]}, {"lr": 0.005, "initial_lr": 0.01, "params": [1]}]}}
    _retarget_lr(state, 0.2)
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01])  # the schedule's factor 0.5 is kept
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.2, 0.02])


class _Threshold(nn.Module):
    """Class 1 iff the mean pixel is above 0.5 (a margin of 100 per unit of distance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([(0.5 - m) * 100, (m - 0.5) * 100], dim=1)


def test_robust_metric_on_a_model_whose_answer_is_known() -> None:
    from ensemble_core.data import DATASET_INFO, TensorDataset
    from ensemble_core.ensemble import Ensemble
    from workers.ray_tune import robust_val_accuracy

    values = torch.tensor([25, 115, 140, 230], dtype=torch.uint8)  # 0.098, 0.451, 0.549, 0.902
    images = values.view(4, 1, 1, 1).expand(4, 1, 28, 28).contiguous()
    ds = TensorDataset(images, torch.tensor([0, 0, 1, 1]), DATASET_INFO["synthetic"])
    ens = Ensemble([_Threshold()], "mean_logits")
    acc = {eps: robust_val_accuracy(ens, ds, eps=eps, steps=10, n=4, seed=0, device="cpu")
           for eps in (0.01, 0.1, 0.45)}
    # an image flips exactly when the boundary 0.5 is within eps of it
    assert acc == {0.01: 1.0, 0.1: 0.5, 0.45: 0.0}
    assert robust_val_accuracy(ens, ds, eps=0.1, steps=10, n=2, seed=0, device="cpu") == 0.5  # first n only


def test_the_trial_book_tracks_history_best_and_early_stops() -> None:
    from workers.ray_common import DriveState
    from workers.ray_tune import _TrialBook

    ts = TuneSpec.model_validate({"base": DKD, "search_space": {"zeta": {"type": "choice", "values": [0.5]}}})
    book = _TrialBook(ts, total=4)
    st = DriveState()
    book.handle("trials", [{"trial_id": "a", "status": "RUNNING", "config": {"zeta": 0.1}},
                           {"trial_id": "b", "status": "PENDING", "config": {"zeta": 0.9}}], st)
    for it, acc in ((1, 0.5), (2, 0.7), (3, 0.6)):
        book.handle("result", {"trial_id": "a", "metrics": {"training_iteration": it, "val_clean_acc": acc}},
                    st)
    # a trial restarted from its epoch-2 checkpoint reports epoch 3 again: the history keeps one of each
    book.handle("result", {"trial_id": "a", "metrics": {"training_iteration": 3, "val_clean_acc": 0.65}}, st)
    book.handle("trials", [{"trial_id": "a", "status": "TERMINATED", "config": {"zeta": 0.1}},
                           {"trial_id": "b", "status": "RUNNING", "config": {"zeta": 0.9}}], st)
    rows = {r["trial_id"]: r for r in book.snapshot()}
    a = rows["a"]
    assert [h["training_iteration"] for h in a["history"]] == [1, 2, 3]
    assert a["best"] == 0.7 and a["last"] == 0.65 and a["epochs_done"] == 3 and a["progress"] == 0.75
    assert a["stopped_early"] and not a["cancelled"]  # terminated after 3 of 4 epochs: the scheduler's stop
    book.finish(cancelled=True)
    rows = {r["trial_id"]: r for r in book.snapshot()}
    assert rows["b"]["cancelled"] and rows["b"]["status"] == "TERMINATED"


def test_param_space_and_schedulers() -> None:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from workers.ray_tune import param_space_for, scheduler_for

    space = {"zeta": {"type": "choice", "values": [0.1, 0.5]}, "lr": {"type": "loguniform", "low": 1e-3,
                                                                      "high": 1e-1}}
    ts = TuneSpec.model_validate({"base": DKD, "search_space": space})
    ps = param_space_for(ts)
    assert ps["zeta"].categories == [0.1, 0.5] and ps["lr"].lower == 1e-3
    grid = TuneSpec.model_validate({"base": DKD, "search_alg": "grid",
                                    "search_space": {"zeta": {"type": "choice", "values": [0.1, 0.5]}}})
    assert param_space_for(grid)["zeta"] == {"grid_search": [0.1, 0.5]}
    asha = scheduler_for(ts, max_t=4)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 4
    pbt = scheduler_for(TuneSpec.model_validate({"base": DKD, "search_space": space, "scheduler": "pbt"}), 4)
    assert isinstance(pbt, PopulationBasedTraining)
    assert pbt._hyperparam_mutations["zeta"] == [0.1, 0.5]


def test_the_best_trial_is_chosen_among_complete_trials() -> None:
    from types import SimpleNamespace

    from workers.ray_tune import pick_best

    def r(name: str, it: int, acc: float | None) -> SimpleNamespace:
        return SimpleNamespace(name=name, metrics={"training_iteration": it, "val_clean_acc": acc})

    stopped_high = r("stopped", 2, 0.9)  # ASHA stopped it at epoch 2 of 4 (a partly trained ensemble)
    complete = [r("a", 4, 0.6), r("b", 4, 0.8), r("nan", 4, float("nan"))]
    assert pick_best([stopped_high, *complete], "val_clean_acc", "max", 4).name == "b"
    assert pick_best([stopped_high, *complete], "val_clean_acc", "min", 4).name == "a"
    assert pick_best([stopped_high, r("c", 1, 0.2)], "val_clean_acc", "max", 4).name == "stopped"
    assert pick_best([r("none", 4, None)], "val_clean_acc", "max", 4) is None
