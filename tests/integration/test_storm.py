"""A CI-sized submission storm (issue #27): concurrent ``POST /v1/jobs`` through uvicorn, half replays.

The code of ``python -m bench storm`` (``bench/storm.py``) with 60 keys: 120 requests released at once
against ``create_app`` served by uvicorn in its own process (auth on, two owners, a real PostgreSQL).
Every identical replay returns the first job, every 10th key's replay with a different body is a 409,
exactly one job per key exists afterwards, and no answer is a 5xx or a transport error.
"""

from __future__ import annotations

import pytest

from bench.storm import check, plan, run_storm

pytestmark = pytest.mark.integration


def test_a_storm_of_submissions_with_replays_makes_exactly_one_job_per_key(pg_url: str) -> None:
    figures = run_storm(pg_url, n_keys=60, conflict_every=10, seed=1, timeout_s=60)
    print(f"\nstorm: {figures['requests']} requests, statuses {figures['statuses']}, p50 {figures['p50_s']:.3f} s, "
          f"p99 {figures['p99_s']:.3f} s, wall {figures['wall_s']:.1f} s")
    assert figures["problems"] == [], figures["problems"][:10]
    assert figures["jobs_in_db"] == 60 and figures["server_errors"] == 0
    assert figures["statuses"] == {201: 114, 409: 6}, figures["statuses"]


def test_the_storm_checker_catches_duplicates_and_missing_conflicts() -> None:
    reqs = plan(2, ["t"], conflict_every=2, seed=0)  # key 0 conflicting, key 1 identical
    good = []
    for r in reqs:
        if r.key.endswith("0"):
            good.append((409, {}, False, 0.1) if r.replay else (201, {"id": "a"}, False, 0.1))
        else:
            good.append((201, {"id": "b"}, r.replay, 0.1))
    assert check(reqs, good, 2)["problems"] == []
    dup = [(201, {"id": f"x{i}"}, False, 0.1) for i in range(4)]  # a replay that made a second job
    problems = check(reqs, dup, 4)["problems"]
    assert len(problems) == 3 and any("4 jobs" in p for p in problems)
