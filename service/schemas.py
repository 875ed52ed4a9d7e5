"""Request and response models of the REST API (they document the OpenAPI schema)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NOTE_CHARS = 4000  # a job's free-text note (the check constraint of migration 0007)
MAX_TAGS = 16
TAG_HELP = "1-40 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"


def check_tags(tags: list[str] | None) -> list[str] | None:
    """Tags as stored: each valid (:data:`TAG_HELP`), duplicates dropped (first kept); ValueError otherwise."""
    if tags is None:
        return None
    from service.model_registry import TAG_RE

    for t in tags:
        if not isinstance(t, str) or not TAG_RE.match(t):
            raise ValueError(f"tag {str(t)[:50]!r}: a tag is {TAG_HELP}")
    return list(dict.fromkeys(tags))


def check_note(note: str | None) -> str | None:
    """A note PostgreSQL can store (no NUL character)."""
    if note is not None and "\x00" in note:
        raise ValueError("NUL characters are not allowed")
    return note

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
JobKind = Literal["train", "evaluate", "tune", "trial"]


class JobCreate(BaseModel):
    """A job submission. ``spec`` is validated by the kind's spec model (``ensemble_core.spec``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "train",
                    "spec": {
                        "method": "baseline",
                        "dataset": "mnist",
                        "architecture": "lenet5",
                        "members": 3,
                        "epochs": 2,
                        "train_subset": 10000,
                        "workers": 2,
                    },
                },
                {
                    "kind": "evaluate",
                    "spec": {
                        "target_job": "3f6c1c2e-0000-4000-8000-000000000000",
                        "n_examples": 500,
                        "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 20}],
                    },
                },
            ]
        },
    )

    kind: Literal["train", "evaluate", "tune"]
    spec: dict[str, Any] = Field(
        default_factory=dict, description="TrainSpec / EvaluateSpec / TuneSpec fields"
    )
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="retries of transient failures (default 3)"
    )
    deadline_seconds: float | None = Field(
        None, gt=0, le=30 * 86400,
        description="the job fails (not retried) when it has not finished this many seconds after its first "
        "start; retries and their waits count (default: no deadline)",
    )
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS,
                            description=f"labels to find the job by (GET /v1/jobs?tag=...): at most {MAX_TAGS}, "
                            f"each {TAG_HELP}; the tag 'keep' exempts the job from retention")
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, description="free text (at most 4,000 characters)")

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, v: list[str]) -> list[str] | None:
        return check_tags(v)

    @field_validator("note")
    @classmethod
    def _valid_note(cls, v: str | None) -> str | None:
        return check_note(v)


class JobUpdate(BaseModel):
    """``PATCH /v1/jobs/{id}``: a job's tags and note (at any status). Fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"add_tags": ["paper-table-3"], "note": "the run with the fixed learning rate"}]})

    tags: list[str] | None = Field(None, max_length=MAX_TAGS, description="replace every tag")
    add_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS, description="add these tags")
    remove_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS, description="remove these tags")
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, description="the note; null clears it")

    @field_validator("tags", "add_tags", "remove_tags")
    @classmethod
    def _valid_tags(cls, v: list[str] | None) -> list[str] | None:
        return check_tags(v)

    @field_validator("note")
    @classmethod
    def _valid_note(cls, v: str | None) -> str | None:
        return check_note(v)


class Job(BaseModel):
    id: uuid.UUID
    kind: JobKind
    status: JobStatus
    priority: int
    spec: dict[str, Any] = Field(description="the resolved spec: every default filled in")
    progress: float = Field(description="0..1")
    stage: str | None = Field(None, description="current stage (train: stage name; evaluate: attack)")
    epoch: int | None = Field(None, description="current global epoch (train)")
    total_epochs: int | None = None
    attempts: int = Field(description="times a worker claimed the job (including infrastructure failures)")
    max_attempts: int = Field(description="attempts the job's own failures may use; infrastructure failures are "
                              "not charged")
    infra_failures: int = Field(0, description="attempts lost to the infrastructure (a worker died, its lease "
                                "expired; Ray failed beyond its restarts): retried without spending max_attempts")
    error: str | None = None
    cancel_requested: bool
    depends_on: list[uuid.UUID]
    parent_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    lease_owner: str | None = Field(None, description="the worker that holds (or last held) the job")
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None
    run_after: datetime
    has_result: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = Field(None, description="only in trial listings")
    owner: str | None = Field(None, description="owner of the API token that submitted the job (none with auth off)")
    deadline_seconds: float | None = Field(None, description="seconds from its first start the job may take")
    tags: list[str] = Field(default_factory=list)
    note: str | None = None
    gpus: float = Field(0.0, description="GPUs the job reserves while it runs (counted against its owner's quota)")
    waiting_reason: str | None = Field(
        None, description="queued jobs: why it has not started (a dependency, a retry backoff, its owner's quota, "
        "or waiting for a free worker)")
    preempt_requested: bool = Field(False, description="a job of higher priority waits: the run stops at its next "
                                    "epoch checkpoint and is re-queued")
    preempted_by: uuid.UUID | None = None
    preemptions: int = Field(0, description="times the job was preempted (re-queued at an epoch checkpoint)")


class JobList(BaseModel):
    items: list[Job]
    total: int
    limit: int
    offset: int


class JobEvent(BaseModel):
    id: int
    at: datetime
    event: str
    from_status: str | None
    to_status: str | None
    attempt: int
    worker: str | None
    detail: str | None


class MetricPoint(BaseModel):
    name: str
    step: int = Field(description="train: global epoch (1-based)")
    value: float
    attempt: int
    at: datetime


class Metrics(BaseModel):
    job_id: uuid.UUID
    names: list[str]
    items: list[MetricPoint]


class LogLine(BaseModel):
    id: int = Field(description="increasing; pass as ?after= to read on")
    at: datetime
    attempt: int
    line: str


class Logs(BaseModel):
    job_id: uuid.UUID
    items: list[LogLine]
    next_after: int


class Artifact(BaseModel):
    name: str = Field(description="path relative to the job's artifacts directory")
    size: int
    modified: datetime


class Artifacts(BaseModel):
    job_id: uuid.UUID
    items: list[Artifact]


class Methods(BaseModel):
    items: list[dict[str, Any]]


class ErrorItem(BaseModel):
    field: str = Field(description="dotted location, e.g. spec.hyperparameters.zeta")
    msg: str
    type: str
    loc: list[str | int]


class ValidationErrorResponse(BaseModel):
    detail: list[ErrorItem]


class ErrorResponse(BaseModel):
    detail: str
