"""Idle warm resources of one job-worker process freed for another process's run (workers/warm.py, the demand
board), on the session's real local Ray (2 CPUs) and real MNIST.

Process A (a subprocess, ``RE_WARM_IDLE_SECONDS=600``) runs a one-worker train job and keeps its warm actor
idle, holding one of the two cores. This process then needs cores: a run that fits in the free core asks
nothing and A keeps its actor; a two-worker DDP job does not fit, asks for room, and A frees its actor within
seconds (not after 600 s), so the job runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HOLDER = r'''
import os, sys, tempfile, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
from workers.ray_train import run_train_job
from workers.warm import POOL
tmp = tempfile.mkdtemp()
spec = {"method": "baseline", "dataset": "mnist", "members": 2, "epochs": 1, "batch_size": 64,
        "train_subset": 256, "val_size": 64, "eval_subset": 100, "workers": 1}
run_train_job(spec, job_id="holder", storage_path=os.path.join(tmp, "storage"),
              artifacts_dir=os.path.join(tmp, "artifacts"), on_epoch=lambda m: None,
              should_stop=lambda: False, log=lambda s: None)
print("IDLE", POOL.idle_count(), flush=True)
sys.stdin.readline()  # the test says when to start watching
t0 = time.monotonic()
while POOL.idle_count() and time.monotonic() - t0 < float(sys.argv[2]):
    time.sleep(0.1)
print("RELEASED" if POOL.idle_count() == 0 else "KEPT", round(time.monotonic() - t0, 2), flush=True)
'''


class Holder:
    """Process A: a job worker's process with an idle warm actor."""

    def __init__(self, watch_s: float) -> None:
        import ray

        env = {**os.environ, "RE_WARM_IDLE_SECONDS": "600", "RE_WARM_TRAIN": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, ray.get_runtime_context().gcs_address, str(watch_s)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.split() == ["IDLE", "1"], line + self.proc.stderr.read()  # type: ignore[union-attr]

    def watch(self) -> None:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def outcome(self, timeout: float) -> tuple[str, float]:
        out, err = self.proc.communicate(timeout=timeout)
        word, seconds = out.split()[:2]
        return word, float(seconds)


def _free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def _wait_for_free(cpus: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _free_cpus() < cpus:
        assert time.monotonic() < deadline, f"Ray has {_free_cpus()} CPU free, expected {cpus}"
        time.sleep(0.2)


@pytest.fixture()
def quiet_board(ray_session: None) -> Iterator[Any]:
    """The demand board with no request open (another test in this Ray session may have opened one)."""
    import ray

    from workers.warm import demand_board

    board = demand_board()
    time.sleep(ray.get(board.open_for.remote()))
    _wait_for_free(2.0, 60)  # nothing of an earlier test still holds a core
    yield board


def test_a_run_that_fits_in_the_free_cores_asks_nothing_and_the_idle_actor_is_kept(quiet_board: Any) -> None:
    import ray

    from workers.warm import WATCH_S, ask_for_room

    holder = Holder(watch_s=4 * WATCH_S)
    try:
        _wait_for_free(1.0, 30)
        assert _free_cpus() == pytest.approx(1.0)  # A's idle actor holds the other core
        before = ray.get(quiet_board.requests.remote())
        assert ask_for_room(1.0) is False
        holder.watch()
        word, _ = holder.outcome(60)
        assert word == "KEPT"
        assert ray.get(quiet_board.requests.remote()) == before and ray.get(quiet_board.open_for.remote()) == 0
    finally:
        holder.proc.kill()


def test_a_ddp_job_that_needs_the_held_core_gets_it_within_seconds(quiet_board: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from workers.ray_train import run_train_job
    from workers.warm import DEMAND_OPEN_S, WATCH_S

    monkeypatch.setenv("RE_WARM_DDP", "0")  # the cold path: Ray Train's fit() waits for both cores
    holder = Holder(watch_s=120)  # without the board A would keep its actor 600 s; it stops watching at 120 s
    try:
        before = ray.get(quiet_board.requests.remote())
        holder.watch()
        spec = {"method": "baseline", "dataset": "mnist", "members": 2, "epochs": 1, "batch_size": 64,
                "train_subset": 512, "val_size": 64, "eval_subset": 100, "workers": 2}
        logs: list[str] = []
        out = run_train_job(spec, job_id="needs-room", storage_path=str(tmp_path / "storage"),
                            artifacts_dir=str(tmp_path / "artifacts"), on_epoch=lambda m: None,
                            should_stop=lambda: False, log=logs.append)
        word, seconds = holder.outcome(60)
        assert word == "RELEASED", (word, seconds)
        assert seconds < 3 * WATCH_S + 5  # the watcher looks every WATCH_S seconds
        assert ray.get(quiet_board.requests.remote()) == before + 1
        assert ray.get(quiet_board.open_for.remote()) <= DEMAND_OPEN_S
        assert 0.0 <= out["metrics"]["test_clean_acc"] <= 1.0 and any("2 worker(s)" in x for x in logs)
    finally:
        holder.proc.kill()
