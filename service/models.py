"""SQLAlchemy 2 models of the queue's tables.

The schema is created and changed only by Alembic (``migrations/``); these classes mirror it so the
code can query with typed columns. Status transitions are done with single guarded ``UPDATE``
statements in :mod:`service.queue`; database triggers (see the migration) record every transition
in ``job_events`` and send ``NOTIFY`` so workers wake up.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("running", "cancelling")
JOB_KINDS = ("train", "evaluate", "tune", "trial")
CLAIMABLE_KINDS = ("train", "evaluate", "tune")  # trials are rows written by their tune job, never claimed


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Double, server_default="0")
    stage: Mapped[str | None] = mapped_column(Text)
    epoch: Mapped[int | None] = mapped_column(Integer)
    total_epochs: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="3")
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str | None] = mapped_column(Text)
    depends_on: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), server_default="{}")
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    owner: Mapped[str | None] = mapped_column(Text)  # migration 0002: the submitting token's owner
    deadline_seconds: Mapped[float | None] = mapped_column(Double)  # migration 0003: per-job deadline
    infra_failures: Mapped[int] = mapped_column(Integer, server_default="0")  # migration 0004
    # migration 0007: organisation, fair sharing and preemption
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    note: Mapped[str | None] = mapped_column(Text)
    gpus: Mapped[float] = mapped_column(Double, server_default="0")
    preempt_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    preempted_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    preemptions: Mapped[int] = mapped_column(Integer, server_default="0")

    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="ck_jobs_status"),
        CheckConstraint(f"kind IN {JOB_KINDS!r}", name="ck_jobs_kind"),
        CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="ck_jobs_attempts"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        Index(
            "ix_jobs_claim",
            text("priority DESC"),
            "seq",
            postgresql_where=text("status = 'queued' AND kind <> 'trial'"),
        ),
        # migration 0005: submissions' keys are unique per owner, trial rows' keys per parent tune job
        Index(
            "uq_jobs_owner_idempotency_key",
            text("COALESCE(owner, '')"),
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL AND kind <> 'trial'"),
        ),
        Index(
            "uq_jobs_trial_key",
            "parent_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("kind = 'trial'"),
        ),
        Index(
            "ix_jobs_lease_expires_at",
            "lease_expires_at",
            postgresql_where=text("status IN ('running', 'cancelling')"),
        ),
        Index("ix_jobs_status_kind", "status", "kind"),
        Index("ix_jobs_parent_id", "parent_id", postgresql_where=text("parent_id IS NOT NULL")),
        Index("ix_jobs_owner_seq", "owner", "seq"),
        CheckConstraint("cardinality(tags) <= 16", name="ck_jobs_tags"),
        CheckConstraint("char_length(note) <= 4000", name="ck_jobs_note"),
        CheckConstraint("gpus >= 0", name="ck_jobs_gpus"),
        Index("ix_jobs_tags", "tags", postgresql_using="gin"),
        Index("ix_jobs_owner_created", "owner", "created_at"),
    )


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    event: Mapped[str] = mapped_column(Text)
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    worker: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))

    __table_args__ = (UniqueConstraint("job_id", "name", "step", name="uq_job_metrics_series"),)


class JobLog(Base):
    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    line: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_job_logs_job_id", "job_id", "id"),)


class ApiToken(Base):
    """A bearer token of the API (migration 0002): only its SHA-256 hash is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(Text, unique=True)
    prefix: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(Text, index=True)
    scope: Mapped[str] = mapped_column(Text, server_default="user")
    name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (CheckConstraint("scope IN ('user', 'admin')", name="ck_api_tokens_scope"),)


class RegisteredModel(Base):
    """A registered ensemble (migration 0006): its files are ``<models dir>/<id>/`` (:mod:`service.model_registry`)."""

    __tablename__ = "models"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    source: Mapped[str] = mapped_column(Text)  # upload | train_job
    source_job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="SET NULL"))
    architecture: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str] = mapped_column(Text)
    combine: Mapped[str] = mapped_column(Text)
    members: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("source IN ('upload', 'train_job')", name="ck_models_source"),
        CheckConstraint("members >= 1 AND members <= 16", name="ck_models_members"),
        Index("uq_models_owner_name_version", text("COALESCE(owner, '')"), "name", "version", unique=True),
        Index("ix_models_owner_created", "owner", "created_at"),
        Index("ix_models_source_job", "source_job_id", postgresql_where=text("source_job_id IS NOT NULL")),
    )


class OwnerPolicy(Base):
    """Retention rules and quotas of one owner (migration 0007). ``owner_key``: the owner, ``''`` for jobs
    without one (authentication off), ``'*'`` for the defaults of every owner without a value of its own."""

    __tablename__ = "owner_policies"

    owner_key: Mapped[str] = mapped_column(Text, primary_key=True)
    keep_days: Mapped[int | None] = mapped_column(Integer)
    keep_last: Mapped[int | None] = mapped_column(Integer)
    max_running: Mapped[int | None] = mapped_column(Integer)
    max_gpus: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Webhook(Base):
    """A webhook subscription of one owner (migration 0007; :mod:`service.webhooks`)."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    thresholds: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    secret: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, server_default="true")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One event for one subscription, with its delivery state (migration 0007)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    webhook_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("webhooks.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    dedupe_key: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
