"""API tokens (stored hashed) and job ownership.

``api_tokens`` holds one row per bearer token: its SHA-256 hash (never the token), the owner it
acts for and its scope (``user`` or ``admin``). ``jobs.owner`` is the owner of the token that
submitted the job (NULL for jobs submitted with authentication off); trial rows, which a tune job's
worker writes, inherit their parent's owner in a BEFORE INSERT trigger.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNER_FN = """
CREATE FUNCTION re_jobs_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.owner IS NULL AND NEW.parent_id IS NOT NULL THEN
    SELECT owner INTO NEW.owner FROM jobs WHERE id = NEW.parent_id;
  END IF;
  RETURN NEW;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("token_hash", sa.Text, nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False, server_default="user"),
        sa.Column("name", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("scope IN ('user', 'admin')", name="ck_api_tokens_scope"),
        sa.CheckConstraint("length(token_hash) = 64", name="ck_api_tokens_hash"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_owner", "api_tokens", ["owner"])

    op.add_column("jobs", sa.Column("owner", sa.Text))
    op.create_index("ix_jobs_owner_seq", "jobs", ["owner", "seq"])
    op.execute(OWNER_FN)
    op.execute(
        "CREATE TRIGGER re_jobs_owner BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION re_jobs_owner()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS re_jobs_owner ON jobs")
    op.execute("DROP FUNCTION IF EXISTS re_jobs_owner()")
    op.drop_index("ix_jobs_owner_seq", table_name="jobs")
    op.drop_column("jobs", "owner")
    op.drop_index("ix_api_tokens_owner", table_name="api_tokens")
    op.drop_table("api_tokens")
