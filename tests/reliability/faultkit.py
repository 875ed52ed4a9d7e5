"""Helpers of the fault-injection suite: the restartable embedded PostgreSQL (:mod:`bench.faults`) and the
suite's tally."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from bench.faults import RestartablePostgres, ran_twice

__all__ = ["RestartablePostgres", "Tally", "ran_twice"]


# ------------------------------------------------------------------------------------------ the tally
@dataclass
class Tally:
    """Figures of the whole suite (``docs/reliability.md``, section *Fault injection*)."""

    injections: dict[str, int] = field(default_factory=dict)
    jobs_submitted: int = 0
    jobs_finished: int = 0
    jobs_lost: int = 0
    jobs_run_concurrently_twice: int = 0
    epochs_redone: list[dict[str, Any]] = field(default_factory=list)
    tests: dict[str, float] = field(default_factory=dict)

    def inject(self, kind: str) -> None:
        self.injections[kind] = self.injections.get(kind, 0) + 1

    def redone(self, fault: str, epochs: int) -> None:
        self.epochs_redone.append({"fault": fault, "epochs_redone": epochs})

    def account(self, engine: Engine, job_ids: list[str], *, expected: str = "succeeded") -> None:
        """Count the jobs of one test: finished (in ``expected``), lost, and run twice at once.

        A job is *lost* when its row is gone or it did not reach ``expected``. It was *run concurrently
        twice* when one of its ``started`` transitions did not come from ``queued`` (a second claim
        while an attempt held the lease), when its attempts do not go up one by one, or when a worker
        wrote log lines for an attempt after a later attempt had started (a fenced-out writer).
        """
        self.jobs_submitted += len(job_ids)
        with engine.connect() as c:
            for jid in job_ids:
                row = c.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": jid}).first()
                if row is None or row.status != expected:
                    self.jobs_lost += 1
                    continue
                self.jobs_finished += 1
                if ran_twice(c, jid):
                    self.jobs_run_concurrently_twice += 1
