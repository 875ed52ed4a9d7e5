"""The benchmark helpers' arithmetic (bench/) and the methods' pass counts (``Method.step_cost``).

No timing is asserted here: only the floors, percentiles and start-up figures the benchmarks compute
from their measurements, and that every registered method states a usable pass count.
"""

from __future__ import annotations

import pytest

from bench.common import percentile
from bench.methods import PRIMITIVES, floor_seconds, format_cost
from bench.service_overhead import startup_figures, startup_table
from ensemble_core.methods import get_method, method_names
from ensemble_core.spec import TrainSpec

PRIM = {"fwd": 0.01, "fwd_bwd": 0.03, "input_grad": 0.025, "double": 0.08}


def test_floor_is_the_weighted_sum_of_primitives_plus_one_optimizer_step() -> None:
    assert floor_seconds({"fwd_bwd": 3.0}, PRIM, 0.002) == pytest.approx(0.092)
    # CCE-like: 3 members x 10 PGD steps, then (1 + 3) forward+backward per member
    assert floor_seconds({"input_grad": 30.0, "fwd_bwd": 12.0}, PRIM, 0.0) == pytest.approx(30 * 0.025 + 12 * 0.03)
    assert floor_seconds({"fwd_bwd": 1.0, "fwd": 2.0}, PRIM, 0.001) == pytest.approx(0.051)
    assert floor_seconds({}, PRIM, 0.004) == pytest.approx(0.004)


def test_floor_rejects_unknown_primitives_and_negative_counts() -> None:
    with pytest.raises(KeyError, match="backward"):
        floor_seconds({"backward": 1.0}, PRIM, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        floor_seconds({"fwd": -1.0}, PRIM, 0.0)


def test_format_cost() -> None:
    assert format_cost({"input_grad": 30.0, "fwd_bwd": 12.0}) == "input_grad×30 fwd_bwd×12"


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_startup_figures() -> None:
    f = startup_figures(t_first_epoch_s=12.0, first_epoch_steps_s=2.0, total_s=40.0)
    assert f["to_first_step_s"] == pytest.approx(10.0)
    assert f["startup_share"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        startup_figures(5.0, 6.0, 40.0)  # an epoch's steps cannot outlast the time to its end
    with pytest.raises(ValueError):
        startup_figures(50.0, 1.0, 40.0)


def _method(name: str, members: int = 3, hp: dict | None = None):  # noqa: ANN202 - a Method
    spec = TrainSpec.model_validate({"method": name, "architecture": "lenet5", "members": members,
                                     "hyperparameters": hp or {}})
    return get_method(name).from_spec_dict(spec.hyperparameters, members=members, num_classes=10,
                                           dataset="mnist", architecture="lenet5")


@pytest.mark.parametrize("name", method_names())
def test_every_method_counts_known_primitives_for_every_stage(name: str) -> None:
    members = max(3, get_method(name).min_members)
    method = _method(name, members)
    for stage in method.stages():
        cost = method.step_cost(stage)
        assert cost and set(cost) <= set(PRIMITIVES), (name, stage.name, cost)
        assert all(n >= 0 for n in cost.values()), cost
        assert floor_seconds(cost, PRIM, 0.0) > 0


def test_pass_counts_of_the_methods() -> None:
    dkd = _method("dkd")
    first, last = dkd.stages()[0], dkd.stages()[-1]
    assert dkd.step_cost(first) == {"fwd_bwd": 1.0}
    assert dkd.step_cost(last) == {"fwd_bwd": 1.0, "fwd": 2.0}  # two frozen predecessors, no grad

    all3 = _method("baseline").stages()[0]
    assert _method("cce").step_cost(all3) == {"input_grad": 30.0, "fwd_bwd": 12.0}  # 10 PGD steps
    assert _method("cce", hp={"steps": 3}).step_cost(all3) == {"input_grad": 9.0, "fwd_bwd": 12.0}
    assert _method("cce", hp={"attack_label": "pred"}).step_cost(all3)["fwd"] == 3.0
    assert _method("adv_en").step_cost(all3) == {"input_grad": 30.0, "fwd_bwd": 6.0}
    assert _method("pdd").step_cost(all3) == {"double": 3.0}
    assert _method("pdd", hp={"variant": "pdd"}).step_cost(all3) == {"fwd_bwd": 3.0}
    assert _method("cldl").step_cost(all3) == {"double": 3.0}
    assert _method("cldl", hp={"beta": 0.0}).step_cost(all3) == {"fwd_bwd": 3.0}
    assert _method("parl").step_cost(all3) == {"double": 3.0}
    assert _method("parl", hp={"gamma2": 0.0}).step_cost(all3) == {"fwd_bwd": 3.0}


def test_startup_table_orders_the_phases_and_joins_both_paths() -> None:
    cold = {"path": "cold", "startup_s": {"prepare": 0.1, "ray_scheduling": 5.0, "worker_start": 6.0,
                                          "data": 0.4, "first_batch": 1.25, "total": 12.75}}
    warm = {"path": "warm", "startup_s": {"prepare": 0.01, "ray_scheduling..train_session":
                                          0.3, "data": 0.001, "first_batch": 0.2, "total": 0.511}}
    rows, cols = startup_table([warm, cold, {"path": "bare"}])
    assert cols == ["path", "prepare", "ray_scheduling..train_session", "ray_scheduling",
                    "worker_start", "data", "first_batch", "total"]
    assert [r["path"] for r in rows] == ["warm", "cold"]  # a row without a breakdown is left out
    assert rows[1]["worker_start"] == 6.0 and "worker_start" not in rows[0] and rows[0]["data"] == 0.0


def test_every_registered_benchmark_resolves_to_a_function() -> None:
    import importlib

    from bench.__main__ import BENCHMARKS, OPT_IN

    assert set(BENCHMARKS) >= OPT_IN
    for name, target in BENCHMARKS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func or "run")), name


def test_ddp_pool_reads_ray_process_titles_and_start_times(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import time

    import bench.ddp_pool as dp

    ps = ("  101     12 ray::IDLE\n  102      3 ray::RayTrainWorker.init_train_context\n"
          "  103     40 /usr/bin/python -m pytest\n  104      0 ray::TrainController\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, ps, ""))
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    assert dp.ray_processes() == {101: (988.0, "ray::IDLE"), 102: (997.0, "ray::RayTrainWorker.init_train_context"),
                                  104: (1000.0, "ray::TrainController")}
