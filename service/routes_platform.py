"""Routes for organising and cleaning up jobs, and the owners' policies (issue #24).

- ``PATCH /v1/jobs/{job_id}``: a job's tags and note (:class:`service.schemas.JobUpdate`);
- ``DELETE /v1/jobs/{job_id}``: the job with its artifacts and checkpoints (:func:`service.cleanup.delete_job`;
  409 while it runs);
- ``GET /v1/usage``: the caller's disk use and job counts (an admin may ask for any ``owner``);
- ``GET``/``PUT /v1/retention``, ``POST /v1/retention/apply``: the caller's retention rules, set by the owner;
- ``GET /v1/quotas``, ``PUT /v1/quotas/{owner}``: quotas; only an admin sets them (``*``: the defaults).

Tenancy: the app-wide dependency answers 404 for another owner's job on the routes with a ``job_id``; the other
routes act on the caller's own owner. Nothing here imports torch.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from service import schemas
from service.auth import OWNER_PATTERN, Principal, principal_of
from service.cleanup import JobBusy, apply_retention, delete_job, usage
from service.policies import DEFAULT_KEY, QUOTA_FIELDS, RETENTION_FIELDS, PolicyStore, owner_key
from service.queue import Queue, TooManyTags
from service.settings import Settings
from service.submission import SpecError, error_item

JOB_PATH = "/v1/jobs/{job_id}"


class Retention(BaseModel):
    """An owner's retention rules: finished jobs are deleted (with their files) when older than ``keep_days`` or
    beyond the newest ``keep_last``; jobs tagged ``keep`` are exempt. Null: no such rule. Fields left out of a
    ``PUT`` stay as they are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"keep_days": 30, "keep_last": 200}]})

    keep_days: int | None = Field(None, ge=1, le=36500, description="delete finished jobs older than this many days")
    keep_last: int | None = Field(None, ge=1, le=1_000_000, description="keep only the newest this many finished jobs")


class Quota(BaseModel):
    """Quotas of an owner, enforced when a worker claims a job: a job over them stays queued (its
    ``waiting_reason`` says why). Null: no limit (or the defaults'). Fields left out of a ``PUT`` stay as they are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"max_running": 2, "max_gpus": 4}]})

    max_running: int | None = Field(None, ge=0, le=10_000, description="jobs running at once")
    max_gpus: float | None = Field(None, ge=0, le=100_000, description="GPUs reserved at once by running jobs")


class PolicyView(BaseModel):
    owner: str | None = Field(description="the owner ('*': the defaults; null: the local mode's jobs)")
    own: dict[str, Any] = Field(description="the owner's own values")
    defaults: dict[str, Any] = Field(description="the defaults ('*') used where the owner has none")
    effective: dict[str, Any] = Field(description="what applies")


class DeleteResult(BaseModel):
    id: uuid.UUID
    deleted: list[uuid.UUID] = Field(description="jobs deleted: this one, then dependents deleted with cascade")
    trials: int = Field(description="trial rows deleted with their tune job")
    dependents_cancelled: list[uuid.UUID] = Field(description="queued jobs that depended on it: cancelled, as they "
                                                  "could never run")
    dependents_kept: list[uuid.UUID] = Field(description="finished jobs that depended on it: kept with their results")
    freed_bytes: int
    files_left: list[str] = Field(description="folders that could not be removed now (the orphan sweep retries)")


class Usage(BaseModel):
    owner: str | None
    jobs: dict[str, Any]
    artifacts_bytes: int
    checkpoints_bytes: int = Field(description="Ray Train / Tune run state and checkpoints")
    models: dict[str, Any]
    total_bytes: int
    largest_jobs: list[dict[str, Any]]
    running: dict[str, Any]
    retention: dict[str, Any]
    quota: dict[str, Any]


class RetentionRun(BaseModel):
    dry_run: bool
    owners: list[dict[str, Any]]


def _target_owner(principal: Principal, owner: str | None) -> str | None:
    """The owner a usage or policy request is about: the caller's own; an admin may name another."""
    if owner is None or owner == principal.owner:
        return principal.owner
    if not principal.is_admin:
        raise SpecError([error_item(["query", "owner"], "only an admin token may ask about another owner")])
    if not OWNER_PATTERN.match(owner):
        raise SpecError([error_item(["query", "owner"], "not an owner name")])
    return owner


def register_platform_routes(app: FastAPI, queue: Queue, settings: Settings) -> None:
    """Add the routes to ``app`` (once)."""
    if any(getattr(r, "path", None) == "/v1/usage" for r in app.routes):
        return
    engine = queue.engine
    policies = PolicyStore(engine)
    responses_404: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorResponse}}
    responses_422: dict[int | str, dict[str, Any]] = {422: {"model": schemas.ValidationErrorResponse}}

    @app.patch(JOB_PATH, response_model=schemas.Job, tags=["jobs"], responses={**responses_404, **responses_422})
    def update_job(job_id: uuid.UUID, body: schemas.JobUpdate) -> dict[str, Any]:
        """Change a job's tags and note, at any status: ``tags`` replaces them, ``add_tags`` / ``remove_tags``
        change some, ``note`` sets the note (null clears it). 422 naming the field on bad input."""
        try:
            job = queue.update_meta(job_id, tags=body.tags, add_tags=body.add_tags, remove_tags=body.remove_tags,
                                    note=body.note, set_note="note" in body.model_fields_set)
        except TooManyTags as e:
            raise SpecError([error_item(["tags"], str(e))]) from None
        return {k: v for k, v in job.items() if k not in ("seq", "request_hash")}

    @app.delete(JOB_PATH, response_model=DeleteResult, tags=["jobs"],
                responses={**responses_404, 409: {"model": schemas.ErrorResponse}})
    def remove_job(job_id: uuid.UUID, cascade: Annotated[bool, Query(
            description="also delete the jobs that depend on it (default: queued ones are cancelled, finished "
                        "ones kept)")] = False) -> dict[str, Any]:
        """Delete a job with its artifacts and checkpoints (a tune job with its trials). 409 while it (or a job
        depending on it) is running: cancel first. The rows go in one transaction, then the files; folders a
        crash leaves behind are removed by the orphan sweep."""
        try:
            return delete_job(engine, settings, job_id, cascade=cascade).as_dict()
        except JobBusy as e:
            raise HTTPException(status_code=409, detail=str(e)) from None

    @app.get("/v1/usage", response_model=Usage, tags=["clean-up"], responses=responses_422)
    async def get_usage(request: Request, owner: Annotated[str | None, Query(
            max_length=64, description="admins: another owner")] = None) -> dict[str, Any]:
        """Disk use (artifacts, checkpoints, registered models) and job counts of the caller's owner, the largest
        jobs, running jobs and GPUs, and the retention rules and quotas that apply."""
        who = _target_owner(principal_of(request), owner)
        return await run_in_threadpool(usage, engine, settings, who)

    @app.get("/v1/retention", response_model=PolicyView, tags=["clean-up"])
    def get_retention(request: Request) -> dict[str, Any]:
        """The caller's retention rules (its own, the defaults, and what applies)."""
        who = principal_of(request).owner
        got = policies.get(owner_key(who))
        return {"owner": who, **{k: {f: v[f] for f in RETENTION_FIELDS} for k, v in got.items()}}

    @app.put("/v1/retention", response_model=PolicyView, tags=["clean-up"], responses=responses_422)
    def set_retention(request: Request, body: Retention) -> dict[str, Any]:
        """Set the caller's retention rules (fields left out stay; null removes a rule). They are applied by the
        workers' periodic sweep, by ``POST /v1/retention/apply`` and by ``robust-ensembles cleanup``."""
        who = principal_of(request).owner
        got = policies.set(owner_key(who), {f: getattr(body, f) for f in body.model_fields_set})
        return {"owner": who, **{k: {f: v[f] for f in RETENTION_FIELDS} for k, v in got.items()}}

    @app.post("/v1/retention/apply", response_model=RetentionRun, tags=["clean-up"])
    async def run_retention(request: Request, dry_run: Annotated[bool, Query(
            description="only list what would be deleted")] = True) -> dict[str, Any]:
        """Apply the caller's retention rules now (``dry_run=false``), or list what they would delete."""
        key = owner_key(principal_of(request).owner)
        owners = await run_in_threadpool(apply_retention, engine, settings, keys=[key], dry_run=dry_run)
        return {"dry_run": dry_run, "owners": owners}

    @app.get("/v1/quotas", response_model=PolicyView, tags=["clean-up"], responses=responses_422)
    def get_quota(request: Request, owner: Annotated[str | None, Query(
            max_length=64, description="admins: another owner, or * for the defaults")] = None) -> dict[str, Any]:
        """The quotas of the caller's owner (an admin: of any owner, ``*`` for the defaults)."""
        principal = principal_of(request)
        if owner == DEFAULT_KEY and principal.is_admin:
            who, key = DEFAULT_KEY, DEFAULT_KEY
        else:
            who = _target_owner(principal, owner)
            key = owner_key(who)
        got = policies.get(key)
        return {"owner": who, **{k: {f: v[f] for f in QUOTA_FIELDS} for k, v in got.items()}}

    @app.put("/v1/quotas/{owner}", response_model=PolicyView, tags=["clean-up"],
             responses={**responses_422, 403: {"model": schemas.ErrorResponse}})
    def set_quota(request: Request, owner: str, body: Quota) -> dict[str, Any]:
        """Set an owner's quotas (``*``: the defaults of every owner without its own). Admin tokens only (403
        otherwise). Fields left out stay; null removes a limit."""
        if not principal_of(request).is_admin:
            raise HTTPException(status_code=403, detail="quotas are set with an admin token")
        if owner != DEFAULT_KEY and not OWNER_PATTERN.match(owner):
            raise SpecError([error_item(["path", "owner"], "an owner name (1-64 letters, digits, '_', '.', '@', "
                                                           "'-') or * for the defaults")])
        got = policies.set(owner, {f: getattr(body, f) for f in body.model_fields_set})
        return {"owner": owner, **{k: {f: v[f] for f in QUOTA_FIELDS} for k, v in got.items()}}


__all__ = ["DeleteResult", "PolicyView", "Quota", "Retention", "RetentionRun", "Usage", "register_platform_routes"]
