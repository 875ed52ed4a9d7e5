"""Idempotency keys scoped to their owner; the worker's trial rows keyed apart from user submissions.

Before, one unique index on ``idempotency_key`` made the keys one namespace for every owner: a key one
tenant used first made every other tenant's submission with it a 409 for good, and 409 against 201
told anyone whether some owner had used a key. The worker's trial upsert (``ON CONFLICT
(idempotency_key) DO UPDATE``) could also rewrite a user's job submitted with a key in the trial
format ``trial:<tune id>:<trial id>``.

Now two partial unique indexes, disjoint by ``kind``:

- ``uq_jobs_owner_idempotency_key``: submissions (every kind but ``trial``), unique per owner;
  ``COALESCE(owner, '')`` puts the jobs submitted with authentication off (owner NULL) in one
  namespace of their own ('' is no valid owner name);
- ``uq_jobs_trial_key``: trial rows, unique per parent tune job; the worker's upsert names this index,
  so it can only ever match its own tune job's trial rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "uq_jobs_owner_idempotency_key",
        "jobs",
        [sa.text("COALESCE(owner, '')"), "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL AND kind <> 'trial'"),
    )
    op.create_index(
        "uq_jobs_trial_key",
        "jobs",
        ["parent_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("kind = 'trial'"),
    )
    op.drop_index("uq_jobs_idempotency_key", table_name="jobs")


def downgrade() -> None:
    # fails (as it should) when two owners now share a key: the old global uniqueness no longer holds
    op.create_index(
        "uq_jobs_idempotency_key",
        "jobs",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index("uq_jobs_trial_key", table_name="jobs")
    op.drop_index("uq_jobs_owner_idempotency_key", table_name="jobs")
