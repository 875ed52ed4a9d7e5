"""Fixtures of the fault-injection suite: a PostgreSQL server the tests may stop and start, and a tally.

The session's shared server (``pg_server`` in ``tests/conftest.py``) is never restarted here: other
tests use it. This suite starts its own embedded server (same package, about 1 s), whose data
directory and Unix socket survive a ``pg_ctl stop`` / start, so the database URL stays valid across a
restart, exactly as for a real PostgreSQL service being restarted.

``tally`` counts what the suite injected and what happened to every job it submitted; the figures are
printed at the end of the session (``-s`` shows them) and written as JSON to ``$RE_RELIABILITY_FIGURES``
when that is set (``docs/reliability.md`` records them).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from faultkit import RestartablePostgres, Tally


@pytest.fixture(scope="session")
def restartable_pg() -> Iterator[RestartablePostgres]:
    """This suite's own PostgreSQL server, which tests stop and start."""
    pg = RestartablePostgres(Path(tempfile.mkdtemp(prefix="re-rpg-")))
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture()
def rpg_url(restartable_pg: RestartablePostgres) -> str:
    """A fresh, migrated database on the restartable server."""
    from service import migrate

    if not restartable_pg.is_running():  # a failed test may have left it stopped
        restartable_pg.start()
    url = restartable_pg.new_database()
    migrate.upgrade(url)
    return url


_TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    yield _TALLY
    summary = asdict(_TALLY)
    print("\nfault-injection figures (tests/reliability):", json.dumps(summary, indent=2))
    out = os.environ.get("RE_RELIABILITY_FIGURES")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
