"""Programmatic Alembic: ``robust-ensembles db upgrade`` and the ``up`` command run migrations from here.

The Alembic scripts live in the top-level ``migrations/`` directory of the project. An installed wheel
carries them as ``service/migrations`` (pyproject.toml maps the directory there); a source checkout or
an editable install has them beside the ``service`` package. No ``alembic.ini`` is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from service.db import sqlalchemy_url


def migrations_dir() -> Path:
    """``RE_MIGRATIONS_DIR``, else the wheel's ``service/migrations``, else the checkout's ``migrations/``."""
    override = os.environ.get("RE_MIGRATIONS_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / "migrations", here.parent / "migrations"]
    for c in candidates:
        if (c / "env.py").exists():
            return c
    raise RuntimeError(
        f"Alembic migrations not found (looked in {', '.join(map(str, candidates))}); "
        "set RE_MIGRATIONS_DIR to the project's migrations/ directory"
    )


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation: a literal % in the URL (percent-encoded password) must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("postgresql://x@/x")).get_current_head()


def current_revision(url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
