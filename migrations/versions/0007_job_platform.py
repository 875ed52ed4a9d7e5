"""What users of job platforms expect (issue #24): organisation, clean-up, webhooks, fair sharing.

- ``jobs.tags`` (text[], at most 16) and ``jobs.note`` (at most 4,000 characters): set at submission, edited
  with ``PATCH /v1/jobs/{id}``; a GIN index serves the ``tag`` filter of ``GET /v1/jobs``.
- ``jobs.gpus``: the GPUs the job reserves while it runs (from its resolved spec), counted against quotas.
- ``jobs.preempt_requested`` / ``preempted_by`` / ``preemptions``: priority preemption at an epoch boundary.
  The events trigger is replaced so that a preemption request and a preemption are recorded in
  ``job_events`` (``preempt_requested``, ``preempted``) beside the status transitions.
- ``owner_policies``: per owner (``owner_key``: the owner; ``''`` for jobs without one; ``'*'`` for the
  defaults) retention rules (``keep_days``, ``keep_last``) and quotas (``max_running``, ``max_gpus``).
- ``re_quota_block(owner, gpus)``: why a job of that owner needing that many GPUs may not start now (NULL:
  it may); the claim and the ``waiting_reason`` of queued jobs (``re_waiting_reason``) both use it.
- ``webhooks`` and ``webhook_deliveries``: per-owner subscriptions and their delivery log. Deliveries are
  queued by triggers in the same transaction as what they report (a job's transition, recorded in
  ``job_events``; a metric point crossing a subscription's threshold), so none is ever lost; the worker's
  housekeeping thread sends them (:mod:`service.webhooks`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUOTA_FN = """
CREATE FUNCTION re_quota_block(p_owner text, p_gpus double precision) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
  lim_running integer;
  lim_gpus double precision;
  n_running bigint;
  n_gpus double precision;
  who text := COALESCE(p_owner, 'the local owner');
BEGIN
  SELECT COALESCE(o.max_running, d.max_running), COALESCE(o.max_gpus, d.max_gpus)
    INTO lim_running, lim_gpus
    FROM (SELECT 1) AS one
    LEFT JOIN owner_policies o ON o.owner_key = COALESCE(p_owner, '')
    LEFT JOIN owner_policies d ON d.owner_key = '*';
  IF lim_running IS NULL AND lim_gpus IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT count(*), COALESCE(sum(gpus), 0) INTO n_running, n_gpus FROM jobs
   WHERE status IN ('running', 'cancelling') AND kind <> 'trial' AND owner IS NOT DISTINCT FROM p_owner;
  IF lim_running IS NOT NULL AND n_running >= lim_running THEN
    RETURN 'quota: ' || who || ' has ' || n_running || ' job(s) running, max_running is ' || lim_running;
  END IF;
  IF lim_gpus IS NOT NULL AND p_gpus > 0 AND n_gpus + p_gpus > lim_gpus THEN
    RETURN 'quota: the job needs ' || p_gpus || ' GPU(s), ' || who || ' uses ' || n_gpus || ' of max_gpus '
           || lim_gpus;
  END IF;
  RETURN NULL;
END $$;
"""

WAITING_FN = """
CREATE FUNCTION re_waiting_reason(p_kind text, p_depends_on uuid[], p_run_after timestamptz, p_owner text,
                                  p_gpus double precision) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
  dep record;
  why text;
BEGIN
  IF p_kind = 'trial' THEN
    RETURN NULL;
  END IF;
  SELECT d.id, d.status INTO dep FROM jobs d
   WHERE d.id = ANY(p_depends_on) AND d.status <> 'succeeded' ORDER BY d.seq LIMIT 1;
  IF FOUND THEN
    RETURN 'waiting for dependency ' || dep.id || ' (' || dep.status || ')';
  END IF;
  IF p_run_after > now() THEN
    RETURN 'retry backoff until ' || to_char(p_run_after AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');
  END IF;
  why := re_quota_block(p_owner, p_gpus);
  IF why IS NOT NULL THEN
    RETURN why;
  END IF;
  RETURN 'waiting for a free worker';
END $$;
"""

# 0001's function, plus the preemption events (a request; the preemption itself, a running -> queued
# transition with preemptions + 1).
EVENTS_FN = """
CREATE OR REPLACE FUNCTION re_jobs_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ev text;
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO job_events (job_id, event, from_status, to_status, attempt, worker, detail)
    VALUES (NEW.id, 'created', NULL, NEW.status, NEW.attempts, NEW.lease_owner, NULL);
  ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
    ev := CASE
      WHEN NEW.status = 'queued' AND NEW.preemptions > OLD.preemptions THEN 'preempted'
      WHEN NEW.status = 'queued' THEN 'requeued'
      WHEN NEW.status = 'running' THEN 'started'
      WHEN NEW.status = 'cancelling' THEN 'cancel_requested'
      ELSE NEW.status END;
    INSERT INTO job_events (job_id, event, from_status, to_status, attempt, worker, detail)
    VALUES (NEW.id, ev, OLD.status, NEW.status, NEW.attempts, COALESCE(NEW.lease_owner, OLD.lease_owner),
            CASE WHEN NEW.status IN ('queued', 'failed', 'cancelled') THEN NEW.error END);
  ELSIF NEW.preempt_requested AND NOT OLD.preempt_requested THEN
    INSERT INTO job_events (job_id, event, from_status, to_status, attempt, worker, detail)
    VALUES (NEW.id, 'preempt_requested', OLD.status, NEW.status, NEW.attempts, NEW.lease_owner,
            'for job ' || COALESCE(NEW.preempted_by::text, '?') || ' of higher priority; stops after its '
            || 'next epoch checkpoint');
    RETURN NEW;
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

OLD_EVENTS_FN = """
CREATE OR REPLACE FUNCTION re_jobs_events() RETURNS trigger LANGUAGE plpgsql AS $$
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

# A job event -> one pending delivery per active subscription of the job's owner that asked for it
# ('job.<event>' or 'job.*'). Trials are their tune job's business and send nothing.
WEBHOOK_JOB_FN = """
CREATE FUNCTION re_webhook_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  j record;
  ev text := 'job.' || NEW.event;
BEGIN
  SELECT id, kind, owner, status, tags, error, priority, attempts, max_attempts, progress,
         COALESCE(spec->>'method', spec->'base'->>'method') AS method,
         COALESCE(spec->>'dataset', spec->'base'->>'dataset') AS dataset
    INTO j FROM jobs WHERE id = NEW.job_id;
  IF NOT FOUND OR j.kind = 'trial' THEN
    RETURN NULL;
  END IF;
  INSERT INTO webhook_deliveries (webhook_id, event, job_id, payload)
  SELECT w.id, ev, j.id, jsonb_build_object(
      'event', ev, 'at', NEW.at,
      'job', jsonb_build_object('id', j.id, 'kind', j.kind, 'owner', j.owner, 'status', j.status,
                                'method', j.method, 'dataset', j.dataset, 'tags', to_jsonb(j.tags),
                                'priority', j.priority, 'attempts', j.attempts, 'progress', j.progress,
                                'error', j.error),
      'transition', jsonb_build_object('event', NEW.event, 'from', NEW.from_status, 'to', NEW.to_status,
                                       'attempt', NEW.attempt, 'worker', NEW.worker, 'detail', NEW.detail))
    FROM webhooks w
   WHERE w.active AND COALESCE(w.owner, '') = COALESCE(j.owner, '')
     AND (ev = ANY(w.events) OR 'job.*' = ANY(w.events));
  RETURN NULL;
END $$;
"""

# A metric point -> a delivery for each threshold it meets, once per (subscription, job, threshold): the
# first point that crosses it. (A re-run epoch that overwrites its point may cross it then.)
WEBHOOK_METRIC_FN = """
CREATE FUNCTION re_webhook_metric() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  j record;
  w record;
  t record;
  hit boolean;
BEGIN
  SELECT id, kind, owner, status, tags, COALESCE(spec->>'method', spec->'base'->>'method') AS method,
         COALESCE(spec->>'dataset', spec->'base'->>'dataset') AS dataset
    INTO j FROM jobs WHERE id = NEW.job_id;
  IF NOT FOUND OR j.kind = 'trial' THEN
    RETURN NULL;
  END IF;
  FOR w IN SELECT id, thresholds FROM webhooks
            WHERE active AND COALESCE(owner, '') = COALESCE(j.owner, '') AND 'metric.threshold' = ANY(events)
              AND jsonb_array_length(thresholds) > 0 LOOP
    FOR t IN SELECT value AS th, ordinality - 1 AS idx FROM jsonb_array_elements(w.thresholds) WITH ORDINALITY LOOP
      CONTINUE WHEN t.th->>'metric' IS DISTINCT FROM NEW.name;
      hit := CASE t.th->>'op'
        WHEN '>=' THEN NEW.value >= (t.th->>'value')::float8
        WHEN '>' THEN NEW.value > (t.th->>'value')::float8
        WHEN '<=' THEN NEW.value <= (t.th->>'value')::float8
        WHEN '<' THEN NEW.value < (t.th->>'value')::float8
        ELSE false END;
      CONTINUE WHEN NOT hit;
      INSERT INTO webhook_deliveries (webhook_id, event, job_id, dedupe_key, payload)
      VALUES (w.id, 'metric.threshold', j.id, 'metric:' || j.id || ':' || t.idx, jsonb_build_object(
          'event', 'metric.threshold', 'at', NEW.at,
          'job', jsonb_build_object('id', j.id, 'kind', j.kind, 'owner', j.owner, 'status', j.status,
                                    'method', j.method, 'dataset', j.dataset, 'tags', to_jsonb(j.tags)),
          'metric', jsonb_build_object('name', NEW.name, 'step', NEW.step, 'value', NEW.value,
                                       'attempt', NEW.attempt),
          'threshold', t.th))
      ON CONFLICT (webhook_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING;
    END LOOP;
  END LOOP;
  RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("tags", pg.ARRAY(sa.Text), nullable=False, server_default="{}"))
    op.add_column("jobs", sa.Column("note", sa.Text))
    op.add_column("jobs", sa.Column("gpus", sa.Double, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("preempt_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("preempted_by", pg.UUID(as_uuid=True)))
    op.add_column("jobs", sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"))
    op.create_check_constraint("ck_jobs_tags", "jobs", "cardinality(tags) <= 16")
    op.create_check_constraint("ck_jobs_note", "jobs", "char_length(note) <= 4000")
    op.create_check_constraint("ck_jobs_gpus", "jobs", "gpus >= 0")
    op.create_index("ix_jobs_tags", "jobs", ["tags"], postgresql_using="gin")
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "created_at"])

    op.create_table(
        "owner_policies",
        sa.Column("owner_key", sa.Text, primary_key=True),
        sa.Column("keep_days", sa.Integer),
        sa.Column("keep_last", sa.Integer),
        sa.Column("max_running", sa.Integer),
        sa.Column("max_gpus", sa.Double),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("keep_days BETWEEN 1 AND 36500", name="ck_owner_policies_keep_days"),
        sa.CheckConstraint("keep_last BETWEEN 1 AND 1000000", name="ck_owner_policies_keep_last"),
        sa.CheckConstraint("max_running BETWEEN 0 AND 10000", name="ck_owner_policies_max_running"),
        sa.CheckConstraint("max_gpus >= 0 AND max_gpus <= 100000", name="ck_owner_policies_max_gpus"),
    )
    op.execute(QUOTA_FN)
    op.execute(WAITING_FN)
    op.execute(EVENTS_FN)
    op.execute("DROP TRIGGER re_jobs_events ON jobs")
    op.execute("CREATE TRIGGER re_jobs_events AFTER INSERT OR UPDATE OF status, preempt_requested ON jobs "
               "FOR EACH ROW EXECUTE FUNCTION re_jobs_events()")

    op.create_table(
        "webhooks",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("owner", sa.Text),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("events", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("thresholds", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("char_length(url) <= 2000", name="ck_webhooks_url"),
    )
    op.create_index("ix_webhooks_owner", "webhooks", [sa.text("COALESCE(owner, '')")])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("webhook_id", pg.UUID(as_uuid=True), sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("job_id", pg.UUID(as_uuid=True)),  # no foreign key: the log outlives a deleted job
        sa.Column("dedupe_key", sa.Text),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        sa.Column("locked_until", sa.DateTime(timezone=True)),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("history", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_status"),
    )
    op.create_index("uq_webhook_deliveries_dedupe", "webhook_deliveries", ["webhook_id", "dedupe_key"],
                    unique=True, postgresql_where=sa.text("dedupe_key IS NOT NULL"))
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["next_attempt_at"],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index("ix_webhook_deliveries_hook", "webhook_deliveries", ["webhook_id", "id"])
    op.execute(WEBHOOK_JOB_FN)
    op.execute(WEBHOOK_METRIC_FN)
    op.execute("CREATE TRIGGER re_webhook_job_event AFTER INSERT ON job_events "
               "FOR EACH ROW EXECUTE FUNCTION re_webhook_job_event()")
    op.execute("CREATE TRIGGER re_webhook_metric AFTER INSERT OR UPDATE OF value ON job_metrics "
               "FOR EACH ROW EXECUTE FUNCTION re_webhook_metric()")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS re_webhook_metric ON job_metrics")
    op.execute("DROP TRIGGER IF EXISTS re_webhook_job_event ON job_events")
    op.execute("DROP FUNCTION IF EXISTS re_webhook_metric()")
    op.execute("DROP FUNCTION IF EXISTS re_webhook_job_event()")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.execute("DROP TRIGGER re_jobs_events ON jobs")
    op.execute(OLD_EVENTS_FN)
    op.execute("CREATE TRIGGER re_jobs_events AFTER INSERT OR UPDATE OF status ON jobs "
               "FOR EACH ROW EXECUTE FUNCTION re_jobs_events()")
    op.execute("DROP FUNCTION IF EXISTS re_waiting_reason(text, uuid[], timestamptz, text, double precision)")
    op.execute("DROP FUNCTION IF EXISTS re_quota_block(text, double precision)")
    op.drop_table("owner_policies")
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.drop_index("ix_jobs_tags", table_name="jobs")
    for name in ("ck_jobs_gpus", "ck_jobs_note", "ck_jobs_tags"):
        op.drop_constraint(name, "jobs", type_="check")
    for column in ("preemptions", "preempted_by", "preempt_requested", "gpus", "note", "tags"):
        op.drop_column("jobs", column)
