"""The kill soak of ``bench/soak.py``, CI-sized: the real stack (embedded PostgreSQL, two API processes, local
Ray, two job-worker processes) under a seeded chaos loop of 2 job-worker SIGKILLs mid-epoch, 1 Ray Train
worker SIGKILL, 1 PostgreSQL restart and 1 API SIGKILL, with small train, evaluate and tune jobs streaming in.
``python -m bench soak`` is the full-size run (``docs/reliability.md``, section *Soak*)."""

from __future__ import annotations

import json

import pytest

from bench.soak import Soak, SoakConfig

pytestmark = pytest.mark.integration


def test_a_ci_sized_soak_loses_nothing_and_runs_nothing_twice() -> None:
    cfg = SoakConfig(worker_kills=2, ray_kills=1, pg_restarts=1, api_kills=1, minutes=15, seed=1, in_flight=2,
                     drain_minutes=10)
    figures = Soak(cfg).run()
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
