"""The start-up breakdown (workers/startup.py) on hand-made stamps, and the training loop's phase hook."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from workers.startup import PG_ENV, breakdown, describe, note_process_group, process_group_stamps


def test_breakdown_names_each_gap_between_consecutive_stamps() -> None:
    stamps = {"call": 100.0, "fit": 100.5, "process": 102.0, "pg_start": 104.0, "pg_end": 104.25, "loop": 105.0,
              "imports": 106.5, "setup": 106.75, "data": 107.0, "model": 107.125, "first_step": 108.0}
    parts = breakdown(stamps)
    assert parts == {"prepare": 0.5, "ray_scheduling": 1.5, "worker_start": 2.0, "process_group": 0.25,
                     "train_session": 0.75, "imports": 1.5, "run_setup": 0.25, "data": 0.25, "model_build": 0.125,
                     "first_batch": 0.875,
                     "total": 8.0}
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])


def test_a_gap_over_missing_stamps_is_named_by_the_first_and_last_phase_it_spans() -> None:
    # the warm path: no Ray Train session and no process group between the call on the actor and its loop
    parts = breakdown({"call": 10.0, "fit": 10.25, "loop": 11.0, "imports": 11.0, "data": 11.5, "model": 11.75,
                       "first_step": 12.0})
    assert list(parts) == ["prepare", "ray_scheduling..train_session", "imports",
                           "run_setup..data", "model_build", "first_batch", "total"]
    assert parts["ray_scheduling..train_session"] == 0.75
    assert parts["total"] == 2.0
    # stamps given out of order are put in order
    assert breakdown({"first_step": 3.0, "call": 1.0}) == {
        "prepare..first_batch": 2.0,
        "total": 2.0}


def test_breakdown_rejects_unknown_stamps_and_time_going_back() -> None:
    with pytest.raises(ValueError, match="unknown start-up stamps: \\['boot'\\]"):
        breakdown({"call": 1.0, "boot": 2.0})
    with pytest.raises(ValueError, match="'loop' is 1.000 s before 'fit'"):
        breakdown({"call": 1.0, "fit": 3.0, "loop": 2.0})
    # within the 50 ms tolerance of two processes reading one clock: clipped to zero
    assert breakdown({"loop": 2.0, "imports": 1.99})["imports"] == 0.0
    assert breakdown({"call": 1.0}) == {}


def test_describe_is_one_line_with_the_total_first() -> None:
    line = describe({"prepare": 0.125, "data": 2.5, "total": 2.625})
    assert line == "start-up 2.62 s to the first step: prepare 0.12, data 2.50"


def test_process_group_stamps_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PG_ENV, raising=False)
    assert process_group_stamps() == {}
    note_process_group(start=1733450000.125, end=1733450000.5)
    assert process_group_stamps() == {"pg_start": 1733450000.125, "pg_end": 1733450000.5}
    monkeypatch.setenv(PG_ENV, "garbage")
    assert process_group_stamps() == {}


def test_the_training_loop_reports_data_model_and_first_step_once_each_in_order() -> None:
    from ensemble_core.training import TrainHooks, train_ensemble

    seen: list[str] = []
    steps: list[int] = []

    def on_phase(name: str) -> None:
        seen.append(name)

    def on_epoch_end(metrics: dict[str, Any], state: Any) -> None:
        steps.append(int(metrics["epoch"]))

    train_ensemble({"method": "baseline", "dataset": "synthetic", "members": 2, "epochs": 2, "batch_size": 32,
                    "train_subset": 96, "val_size": 0, "eval_subset": 64, "seed": 0},
                   device="cpu", hooks=TrainHooks(log=lambda s: None, on_phase=on_phase, on_epoch_end=on_epoch_end))
    assert steps == [1, 2]  # two epochs of three steps ran, and still one first step
    assert seen == ["data", "model", "first_step"]


def test_process_started_at_is_this_process_start_on_the_wall_clock() -> None:
    from workers.startup import process_started_at

    started = process_started_at()
    if started is None:
        pytest.skip("no /proc on this platform")
    # the test process started before this line and at most the test session's length earlier
    assert time.time() - 3600 < started <= time.time()
    # a new process started now is dated now, within the clock's tick and the start-up of python
    before = time.time()
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", "from workers.startup import process_started_at as p; print(p())"],
                         capture_output=True, text=True, check=True, cwd=root).stdout
    assert before - 0.05 <= float(out) <= time.time()
