"""The model registry: ensembles uploaded as safetensors or registered from finished train jobs.

One row per registered model (``models``). Its files (``config.json``, ``model.safetensors``) live in
``<models dir>/<id>/``; the row says who owns it, its name, version and tags, what it is (architecture,
data set, combine rule, members) and where it came from. Names and versions are unique per owner
(``COALESCE(owner, '')``: models registered with authentication off share one namespace, as the jobs'
idempotency keys do in migration 0005) and may not hold a path (the check constraint is the API's pattern).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
VERSION_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), nullable=False, server_default="{}"),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_job_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("architecture", sa.Text(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("combine", sa.Text(), nullable=False),
        sa.Column("members", sa.Integer(), nullable=False),
        sa.Column("config", postgresql.JSONB(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("source IN ('upload', 'train_job')", name="ck_models_source"),
        sa.CheckConstraint("members >= 1 AND members <= 16", name="ck_models_members"),
        sa.CheckConstraint(f"name ~ '{NAME_PATTERN}'", name="ck_models_name"),
        sa.CheckConstraint(f"version ~ '{VERSION_PATTERN}'", name="ck_models_version"),
    )
    op.create_index("uq_models_owner_name_version", "models", [sa.text("COALESCE(owner, '')"), "name", "version"],
                    unique=True)
    op.create_index("ix_models_owner_created", "models", ["owner", "created_at"])
    op.create_index("ix_models_source_job", "models", ["source_job_id"],
                    postgresql_where=sa.text("source_job_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_models_source_job", table_name="models")
    op.drop_index("ix_models_owner_created", table_name="models")
    op.drop_index("uq_models_owner_name_version", table_name="models")
    op.drop_table("models")
