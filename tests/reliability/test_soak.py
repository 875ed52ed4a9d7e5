"""The kill soak of ``bench/soak.py``, CI-sized: the real stack (embedded PostgreSQL, two API processes, local
Ray, two job-worker processes) under a seeded chaos loop of 2 job-worker SIGKILLs mid-epoch, 1 Ray Train
worker SIGKILL, 1 PostgreSQL restart and 1 API SIGKILL, with small train (half of them DDP), evaluate and tune
jobs streaming in.
``python -m bench soak`` is the full-size run (``docs/reliability.md``, section *Soak*).

It runs ``python -m bench soak`` in a process of its own: the soak starts its own local Ray with a private
token for its workers, which the test session's Ray (started by other tests in this process) would not be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# half the train jobs DDP (2 workers): on warm DDP groups, the default path, which two job workers on two cores
# share through the demand board (workers/warm.py)
SIZES = {"RE_SOAK_WORKER_KILLS": "2", "RE_SOAK_RAY_KILLS": "1", "RE_SOAK_PG_RESTARTS": "1", "RE_SOAK_API_KILLS": "1",
         "RE_SOAK_MINUTES": "15", "RE_SOAK_SEED": "1", "RE_SOAK_IN_FLIGHT": "2", "RE_SOAK_DRAIN_MINUTES": "10",
         "RE_SOAK_DDP_SHARE": "0.5"}


def test_a_ci_sized_soak_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RE_SOAK_"))}
    env.update(SIZES, RE_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "bench", "soak"], env=env, cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=45 * 60)
    assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-4000:])
    figures = json.loads((tmp_path / "soak.json").read_text())["figures"]
    print(json.dumps({k: v for k, v in figures.items() if k != "config"}, indent=2))
    assert figures["problems"] == [], figures["problems"]
    # every planned fault was injected (none skipped for want of a train job mid-run)
    assert figures["injections"] == {"worker_kill": 2, "ray_train_worker_kill": 1, "postgres_restart": 1,
                                     "api_kill": 1}, figures["injections_skipped"]
    assert figures["jobs_lost"] == 0 and figures["jobs_run_twice_at_once"] == 0
    assert figures["jobs_not_terminal"] == 0 and figures["jobs_by_status"].get("succeeded") == figures["jobs"]
    # the faults that hit train jobs were recoveries, and each redid at most one epoch (checked per job)
    # (plus any lease a loaded machine let expire: reported, and each allowed its one epoch too)
    assert figures["recoveries"] == 3 + figures["requeues_without_an_injected_fault"]
    assert figures["epochs_redone_total"] <= figures["recoveries"]
    assert figures["checkpoints_verified"] == figures["jobs_by_kind"]["train"] >= 2
    assert figures["errors"] == [], figures["errors"]
