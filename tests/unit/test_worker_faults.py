"""The worker's handling of a database outage at a job's final transition, and of per-job deadlines.

No database is reached here: the engine is never connected (SQLAlchemy connects lazily) and the
transitions are plain callables; the real-Postgres versions are in ``tests/reliability``.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from service.queue import Lease
from service.settings import Settings
from workers.worker import JobRun, Worker


def _worker(tmp_path: Path, lease_seconds: float = 5.0) -> Worker:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://nobody@127.0.0.1:1/none",
                        lease_seconds=lease_seconds)
    return Worker(settings, runners={})


def _down() -> OperationalError:
    return OperationalError("UPDATE jobs ...", {}, Exception("connection refused"))


def test_a_final_transition_is_retried_until_the_database_answers(tmp_path: Path) -> None:
    calls: list[float] = []

    def transition() -> bool:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise _down()
        return True

    assert _worker(tmp_path)._final("succeed", transition) is True
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.45 and calls[2] - calls[1] >= 0.95  # backoff 0.5 s, then 1 s


def test_a_final_transition_gives_up_after_the_lease_length(tmp_path: Path) -> None:
    calls: list[int] = []

    def transition() -> bool:
        calls.append(1)
        raise _down()

    t0 = time.monotonic()
    with pytest.raises(OperationalError):
        _worker(tmp_path, lease_seconds=5.0)._final("succeed", transition)
    assert 3.0 <= time.monotonic() - t0 <= 5.5 and len(calls) == 4  # 0.5 + 1 + 2 s of waits, then no room left


def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def transition() -> bool:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        _worker(tmp_path)._final("succeed", transition)
    assert calls == [1]


def test_a_passed_deadline_makes_the_run_stop(tmp_path: Path) -> None:
    lease = Lease(uuid.uuid4(), "w", 1, "train", {}, 3, (), 0.2)
    settings = Settings(data_dir=tmp_path)
    run = JobRun(lease, None, settings, threading.Event(), deadline_at=time.monotonic() + 0.2)  # type: ignore[arg-type]
    assert not run.deadline_passed and not run.should_stop()
    time.sleep(0.25)
    assert run.deadline_passed and run.should_stop()
    no_deadline = JobRun(lease, None, settings, threading.Event())  # type: ignore[arg-type]
    assert not no_deadline.deadline_passed and not no_deadline.should_stop()
