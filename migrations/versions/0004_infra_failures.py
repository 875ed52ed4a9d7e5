"""Infrastructure failures counted apart from the job's retry budget: ``jobs.infra_failures``.

``attempts`` keeps counting claims (it is the lease's fencing token). A failure of the infrastructure -
a worker that died or stopped heartbeating (its lease expired and the sweep re-queued the job), or a
runner's ``InfrastructureError`` (Ray Train exceeded its ``max_failures``, the Ray controller was lost)
- also increments ``infra_failures``. The retry budget counts only the other attempts, so the job
fails on its own errors after ``max_attempts`` charged attempts (``attempts - infra_failures``) and on
infrastructure errors after the queue's cap (``RE_MAX_INFRA_FAILURES``, default 10), each with its
own exponential backoff.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("infra_failures", sa.Integer, nullable=False, server_default="0"))
    op.create_check_constraint("ck_jobs_infra_failures", "jobs",
                               "infra_failures >= 0 AND infra_failures <= attempts")


def downgrade() -> None:
    op.drop_constraint("ck_jobs_infra_failures", "jobs", type_="check")
    op.drop_column("jobs", "infra_failures")
