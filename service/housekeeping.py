"""The workers' housekeeping thread: webhook deliveries, priority preemption, retention and orphaned folders.

Each worker process runs one :class:`Housekeeper` beside its job loop (``Settings.housekeeping``, on unless
``RE_HOUSEKEEPING=0``), so it keeps working while the worker runs a long job. Every piece of work is claimed in
the database (deliveries with ``FOR UPDATE SKIP LOCKED``, preemption requests with one guarded statement,
deletions under row locks), so any number of workers may run it side by side.

- every second: send the webhook deliveries that are due (:class:`service.webhooks.Dispatcher`);
- every two seconds, with ``Settings.preempt_after_seconds`` set: ask a lower-priority running train job to stop at
  its next epoch checkpoint for a job that has waited that long (:meth:`service.queue.Queue.request_preemption`);
- every ``Settings.retention_sweep_seconds``: apply the owners' retention rules and remove orphaned job folders
  (:mod:`service.cleanup`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy import Engine

from service.models import CLAIMABLE_KINDS
from service.queue import Queue
from service.settings import Settings

log = logging.getLogger("robust_ensembles.housekeeping")

TICK_S = 1.0
PREEMPT_EVERY_S = 2.0


class Housekeeper:
    """Runs :meth:`tick` about once a second on a daemon thread until :meth:`stop`."""

    def __init__(self, engine: Engine, settings: Settings, queue: Queue,
                 kinds: Sequence[str] = CLAIMABLE_KINDS) -> None:
        from service.webhooks import Dispatcher

        self.engine = engine
        self.settings = settings
        self.queue = queue
        self.kinds = tuple(kinds)
        self.dispatcher = Dispatcher(engine, settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_preempt = 0.0
        self._last_retention = time.monotonic()  # the first sweep one interval after start
        self.errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception as e:  # the database may be away for a moment: try again next tick
                self.errors += 1
                log.warning("housekeeping: %s: %s", type(e).__name__, e)

    def tick(self, now: float | None = None) -> None:
        """One round of whatever is due."""
        now = time.monotonic() if now is None else now
        for _ in range(10):  # a backlog drains in rounds of 20, without starving the rest
            if self.dispatcher.run_once() < 20 or self._stop.is_set():
                break
        if self.settings.preempt_after_seconds is not None and now - self._last_preempt >= PREEMPT_EVERY_S:
            self._last_preempt = now
            got = self.queue.request_preemption(self.settings.preempt_after_seconds, self.kinds)
            if got is not None:
                log.info("job %s asked to stop at its next epoch checkpoint for job %s", got[0], got[1])
        if now - self._last_retention >= self.settings.retention_sweep_seconds:
            self._last_retention = now
            self.sweep()

    def sweep(self) -> None:
        """Retention of every owner with rules, then orphaned folders."""
        from service.cleanup import apply_retention, sweep_orphans

        for entry in apply_retention(self.engine, self.settings):
            if entry["deleted"]:
                log.info("retention of %s: deleted %d job(s), freed %d bytes", entry["owner"] or "(local)",
                         len(entry["deleted"]), entry["freed_bytes"])
        sweep_orphans(self.engine, self.settings, grace_seconds=self.settings.orphan_grace_seconds)


__all__ = ["Housekeeper"]
