"""Initial schema: jobs queue, job events, metrics and logs, with transition/notify triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "('queued', 'running', 'succeeded', 'failed', 'cancelling', 'cancelled')"
KINDS = "('train', 'evaluate', 'tune', 'trial')"

# BEFORE UPDATE: housekeeping timestamps, so no code path can forget them.
TOUCH_FN = """
CREATE FUNCTION re_jobs_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := clock_timestamp();
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    IF NEW.status = 'running' AND OLD.status = 'queued' AND NEW.started_at IS NULL THEN
      NEW.started_at := NEW.updated_at;
    END IF;
    IF NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
      NEW.finished_at := NEW.updated_at;
    END IF;
  END IF;
  RETURN NEW;
END $$;
"""

# AFTER INSERT / UPDATE: every status transition is recorded in job_events, and workers are woken:
#   re_jobs   <- a job became claimable (queued) or finished (dependents may now run or fail)
#   re_cancel <- a running job was asked to stop
EVENTS_FN = """
CREATE FUNCTION re_jobs_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ev text;
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO job_events (job_id, event, from_status, to_status, attempt, worker, detail)
    VALUES (NEW.id, 'created', NULL, NEW.status, NEW.attempts, NEW.lease_owner, NULL);
  ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
    ev := CASE NEW.status
      WHEN 'queued' THEN 'requeued'
      WHEN 'running' THEN 'started'
      WHEN 'cancelling' THEN 'cancel_requested'
      ELSE NEW.status END;
    INSERT INTO job_events (job_id, event, from_status, to_status, attempt, worker, detail)
    VALUES (NEW.id, ev, OLD.status, NEW.status, NEW.attempts, COALESCE(NEW.lease_owner, OLD.lease_owner),
            CASE WHEN NEW.status IN ('queued', 'failed', 'cancelled') THEN NEW.error END);
  ELSE
    RETURN NEW;
  END IF;
  IF NEW.kind <> 'trial' THEN
    IF NEW.status = 'queued' OR NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
      PERFORM pg_notify('re_jobs', NEW.kind || ':' || NEW.status);
    ELSIF NEW.status = 'cancelling' THEN
      PERFORM pg_notify('re_cancel', NEW.id::text);
    END IF;
  END IF;
  RETURN NEW;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False, unique=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("spec", pg.JSONB, nullable=False),
        sa.Column("result", pg.JSONB),
        sa.Column("error", sa.Text),
        sa.Column("progress", sa.Double, nullable=False, server_default="0"),
        sa.Column("stage", sa.Text),
        sa.Column("epoch", sa.Integer),
        sa.Column("total_epochs", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("request_hash", sa.Text),
        sa.Column("depends_on", pg.ARRAY(pg.UUID(as_uuid=True)), nullable=False, server_default="{}"),
        sa.Column("parent_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(f"status IN {STATUSES}", name="ck_jobs_status"),
        sa.CheckConstraint(f"kind IN {KINDS}", name="ck_jobs_kind"),
        sa.CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="ck_jobs_attempts"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
    )
    # The claim scans only queued rows, in priority then submission order.
    op.create_index(
        "ix_jobs_claim",
        "jobs",
        [sa.text("priority DESC"), "seq"],
        postgresql_where=sa.text("status = 'queued' AND kind <> 'trial'"),
    )
    # Idempotent submission: one job per key (replays return it).
    op.create_index(
        "uq_jobs_idempotency_key",
        "jobs",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_lease_expires_at",
        "jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text("status IN ('running', 'cancelling')"),
    )
    op.create_index("ix_jobs_status_kind", "jobs", ["status", "kind"])
    op.create_index(
        "ix_jobs_parent_id", "jobs", ["parent_id"], postgresql_where=sa.text("parent_id IS NOT NULL")
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column(
            "job_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")
        ),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("from_status", sa.Text),
        sa.Column("to_status", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("worker", sa.Text),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id", "id"])

    op.create_table(
        "job_metrics",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column(
            "job_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column(
            "at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")
        ),
        sa.UniqueConstraint("job_id", "name", "step", name="uq_job_metrics_series"),
    )

    op.create_table(
        "job_logs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column(
            "job_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")
        ),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("line", sa.Text, nullable=False),
    )
    op.create_index("ix_job_logs_job_id", "job_logs", ["job_id", "id"])

    op.execute(TOUCH_FN)
    op.execute(EVENTS_FN)
    op.execute(
        "CREATE TRIGGER re_jobs_touch BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION re_jobs_touch()"
    )
    op.execute(
        "CREATE TRIGGER re_jobs_events AFTER INSERT OR UPDATE OF status ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION re_jobs_events()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS re_jobs_events ON jobs")
    op.execute("DROP TRIGGER IF EXISTS re_jobs_touch ON jobs")
    op.execute("DROP FUNCTION IF EXISTS re_jobs_events()")
    op.execute("DROP FUNCTION IF EXISTS re_jobs_touch()")
    op.drop_table("job_logs")
    op.drop_table("job_metrics")
    op.drop_table("job_events")
    op.drop_table("jobs")
