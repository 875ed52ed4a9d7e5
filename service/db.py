"""Database URLs and engines (SQLAlchemy 2 + psycopg 3)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url


def sqlalchemy_url(url: str) -> str:
    """Normalise ``postgres://`` / ``postgresql://`` URLs to the psycopg 3 driver SQLAlchemy uses."""
    u = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if u.get_backend_name() != "postgresql":
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got backend {u.get_backend_name()!r}")
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The same database as a plain libpq URI (for psycopg connections used with LISTEN)."""
    return make_url(sqlalchemy_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    return create_engine(
        sqlalchemy_url(url), pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, future=True
    )
