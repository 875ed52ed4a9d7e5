"""Per-job deadlines: ``jobs.deadline_seconds``.

A job with a deadline must finish within that many seconds of its first start (``started_at``;
retries and their waits count). When it is exceeded the worker stops the run and fails the job,
without retrying it. NULL (the default) means no deadline.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deadline_seconds", sa.Double))
    op.create_check_constraint("ck_jobs_deadline", "jobs", "deadline_seconds IS NULL OR deadline_seconds > 0")


def downgrade() -> None:
    op.drop_constraint("ck_jobs_deadline", "jobs", type_="check")
    op.drop_column("jobs", "deadline_seconds")
