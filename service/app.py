"""The REST API (FastAPI), versioned under ``/v1``.

Jobs live in PostgreSQL (:mod:`service.queue`); workers (``robust-ensembles worker``) lease and run
them. Logs and metrics are rows in Postgres, so they are readable here from any machine; artifacts
are files under ``<artifacts root>/<job id>/`` (a directory shared with the workers).

With ``Settings.auth`` on, every ``/v1`` route needs a bearer API token and each job is visible to
its owner (and admins) only (:mod:`service.auth`); request bodies are limited (:mod:`service.limits`).

The module imports no torch: the first request that validates a method's hyperparameters (or lists
methods) loads the method modules; a background thread warms them right after start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from service import schemas
from service.auth import Principal, TokenStore, job_owner, make_auth_dependency, principal_of, server_path_errors
from service.db import make_engine
from service.limits import MAX_ERRORS, BodySizeLimit, cap_errors, check_idempotency_key, check_storable
from service.model_registry import ModelStore
from service.models import JOB_STATUSES, TERMINAL_STATUSES
from service.policies import job_gpus
from service.queue import IdempotencyConflict, InvalidTransition, JobNotFound, Queue
from service.routes_leaderboard import router as leaderboard_router
from service.routes_models import MODELS_PATH, register_model_routes
from service.routes_platform import register_platform_routes
from service.routes_tune import register_tune_routes
from service.routes_ui import router as ui_router
from service.routes_webhooks import register_webhook_routes
from service.security import HostCheck, SecurityHeaders, swagger_ui_html
from service.settings import Settings
from service.submission import (
    JOB_REFERENCES,
    SpecError,
    error_item,
    resolve_model_references,
    resolve_references,
    validate_spec,
)
from service.webhooks import WebhookStore

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"
MAX_OFFSET = 1_000_000_000
MAX_LOG_ID = 2**62
SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
SSE_AUTH_RECHECK_SECONDS = 2.0  # an open log stream re-checks its token this often (revocation reaches it)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in job.items() if k not in ("seq", "request_hash")}
    return out


def _split_csv(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


FILTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # method and data set names in filters


def _aware(value: datetime | None) -> datetime | None:
    """A date or time of a query: without a time zone it is UTC."""
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def list_filter_errors(methods: list[str], datasets: list[str], tags: list[str], q: str | None,
                       since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """422 items for the filters of ``GET /v1/jobs`` (each naming its query parameter)."""
    errors = []
    for name, values in (("method", methods), ("dataset", datasets)):
        bad = [v for v in values if not FILTER_NAME.match(v)]
        if bad or len(values) > 32:
            errors.append(error_item(["query", name], f"{bad[0][:50]!r} is not a name" if bad
                                     else "at most 32 values"))
    try:
        schemas.check_tags(tags)
        if len(tags) > schemas.MAX_TAGS:
            raise ValueError(f"at most {schemas.MAX_TAGS} tags")
    except ValueError as e:
        errors.append(error_item(["query", "tag"], str(e)))
    if q is not None and "\x00" in q:
        errors.append(error_item(["query", "q"], "NUL characters are not allowed"))
    if since is not None and until is not None and _aware(since) >= _aware(until):  # type: ignore[operator]
        errors.append(error_item(["query", "until"], "must be later than since"))
    return errors


def list_artifacts(root: Path) -> list[dict[str, Any]]:
    """Regular files under a job's artifacts directory (temporary and hidden files left out).

    Symbolic links are neither listed nor followed (``lstat``, ``os.walk(followlinks=False)``): a link in
    a job's directory must not reveal the size or time of a file outside it.
    """
    try:
        if not root.is_dir() or root.is_symlink():
            return []
    except OSError:
        return []
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            if fname.startswith("."):
                continue
            p = base / fname
            try:
                st = p.lstat()
            except OSError:  # removed meanwhile
                continue
            if not stat.S_ISREG(st.st_mode):  # symlinks, sockets, fifos
                continue
            items.append(
                {
                    "name": p.relative_to(root).as_posix(),
                    "size": st.st_size,
                    "modified": datetime.fromtimestamp(st.st_mtime, tz=UTC),
                }
            )
    return sorted(items, key=lambda i: i["name"])


MAX_ARTIFACT_NAME_BYTES = 4096  # PATH_MAX; a component may have 255 bytes (NAME_MAX)


def safe_artifact_path(root: Path, name: str) -> Path | None:
    """The file ``name`` inside ``root``, or None when it escapes it (``..``, absolute paths, symlinks).

    Names the file system cannot hold (a component over 255 bytes, the whole over 4096) are None
    without a lookup, and any ``OSError`` of the lookup is None too (Python 3.11's ``Path.is_file()``
    raises on ``ENAMETOOLONG``: a 500 and a logged traceback per request before)."""
    if not name or name.startswith("/") or "\x00" in name:
        return None
    parts = name.split("/")
    if any(part in ("..", "") or part.startswith(".") for part in parts):
        return None
    if len(name.encode("utf-8", "surrogatepass")) > MAX_ARTIFACT_NAME_BYTES or any(
        len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts
    ):
        return None
    try:
        root_real = root.resolve()
        candidate = (root_real / name).resolve()
        if not candidate.is_relative_to(root_real) or not candidate.is_file():
            return None
    except (OSError, ValueError, RuntimeError):  # ENAMETOOLONG, ELOOP, ...: no such artifact
        return None
    return candidate


def describe_method(name: str) -> dict[str, Any]:
    """``Method.describe()``: the hyperparameter schema with JSON-ready defaults and meanings."""
    from ensemble_core.methods import get_method

    return get_method(name).describe()


def describe_specs() -> dict[str, Any]:
    """The JSON schemas of ``POST /v1/jobs``: the body's own fields (``job``: priority, tags, note, ...) and the
    spec of each kind (``kinds``), with the registered names (methods, data sets, architectures, combine rules)
    as enums: what the dashboard's *New job* form is generated from."""
    from ensemble_core.methods import method_names
    from ensemble_core.registry_names import architecture_names, combine_names
    from ensemble_core.spec import DATASETS, EvaluateSpec, TrainSpec, TuneSpec

    kinds = {"train": TrainSpec.model_json_schema(), "evaluate": EvaluateSpec.model_json_schema(),
             "tune": TuneSpec.model_json_schema()}
    names = {"method": method_names(), "dataset": list(DATASETS), "architecture": architecture_names()}
    for field, values in names.items():
        kinds["train"]["properties"][field]["enum"] = values
    for kind in ("train", "evaluate"):
        prop = kinds[kind]["properties"]["combine"]
        prop["anyOf"] = [{"type": "string", "enum": combine_names()}, {"type": "null"}]
    job = schemas.JobCreate.model_json_schema()
    job["properties"] = {k: v for k, v in job["properties"].items() if k not in ("kind", "spec")}
    job.pop("required", None)
    job.pop("examples", None)
    return {"job": job, "kinds": kinds}


def _warm_methods() -> None:
    try:
        from ensemble_core.methods import method_names

        for name in method_names():
            describe_method(name)
    except Exception as e:  # warming is an optimisation; the first request reports any real problem
        log.warning("warming the method registry failed: %s", e)


def create_app(settings: Settings, *, engine: Engine | None = None, warm: bool = True) -> FastAPI:
    """The API for ``settings.database_url`` (which must be set: ``up`` starts the embedded database first)."""
    if engine is None:
        if not settings.database_url:
            raise ValueError("create_app needs settings.database_url (or an engine)")
        engine = make_engine(settings.database_url)
    queue = Queue(
        engine,
        lease_seconds=settings.lease_seconds,
        backoff_base=settings.retry_backoff_seconds,
        backoff_max=settings.retry_backoff_max_seconds,
        default_max_attempts=settings.default_max_attempts,
        max_infra_failures=settings.max_infra_failures,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warm:
            threading.Thread(target=_warm_methods, name="warm-methods", daemon=True).start()
        if settings.auth:
            _warn_without_tokens(engine)
        yield
        engine.dispose()

    app = FastAPI(
        title="robust-ensembles",
        version=API_VERSION,
        summary="Train and evaluate adversarially robust, diversity-promoting ensembles as queued jobs.",
        description="Jobs are submitted here, queued in PostgreSQL and run by workers with Ray Train. "
        "Job states: queued, running, succeeded, failed, cancelling, cancelled.",
        lifespan=lifespan,
        # authentication of /v1 and tenancy of every route with a job_id (service.auth)
        dependencies=[Depends(make_auth_dependency(settings.auth, engine))],
        # /docs is served below with pinned, integrity-checked Swagger UI assets; ReDoc not at all
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    docs_html, docs_policy = swagger_ui_html(app.openapi_url or "/openapi.json", f"{app.title} - API docs")
    # middleware: the last added is the outermost; the security headers go on every answer, 400 and 413 too
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,  # type: ignore[arg-type]
                       routes={("POST", MODELS_PATH): settings.max_model_bytes})
    if not settings.auth and settings.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts)  # type: ignore[arg-type]
    app.add_middleware(SecurityHeaders, docs_policy=docs_policy)  # type: ignore[arg-type]
    tokens = TokenStore(engine)
    app.state.queue = queue
    app.state.settings = settings
    register_tune_routes(app, queue)
    model_store = ModelStore(engine, settings.models_root)
    app.state.model_store = model_store
    register_model_routes(app, queue, model_store)  # /v1/models: the model registry (docs/models.md)
    register_platform_routes(app, queue, settings)  # PATCH / DELETE a job, usage, retention, quotas
    register_webhook_routes(app, settings, WebhookStore(engine))  # /v1/webhooks (docs/webhooks.md)
    app.include_router(leaderboard_router)  # GET /v1/leaderboard (a JSON document, no torch)
    app.include_router(ui_router)  # the dashboard at /ui/ (static files; its JS calls /v1)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        items = []
        for e in errors[:MAX_ERRORS]:  # the rest are counted, not listed (an invalid body of 1 MiB: 100k errors)
            loc = [p for p in e.get("loc", ()) if p != "body"]
            items.append(
                error_item(loc or ["body"], str(e.get("msg", "")), str(e.get("type", "value_error")))
            )
        return JSONResponse(status_code=422, content={"detail": cap_errors(items, total=len(errors))})

    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": cap_errors(exc.errors)})

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": f"no job with id {exc}"})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL is down or restarting: a temporary condition (the pool reconnects once it is back)
        reason = str(getattr(exc, "orig", exc)).strip().split("\n", 1)[0] or type(exc).__name__
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, reason)
        return JSONResponse(status_code=503, headers={"Retry-After": "2"},
                            content={"detail": "database unavailable; retry shortly"})

    responses_422: dict[int | str, dict[str, Any]] = {422: {"model": schemas.ValidationErrorResponse}}

    def check_references(principal: Principal, resolved: dict[str, Any]) -> None:
        """An evaluation may only name train jobs its principal can see (others read as missing)."""
        if principal.is_admin:
            return
        errors = []
        for field in JOB_REFERENCES:
            try:
                ref = uuid.UUID(str(resolved.get(field)))
            except ValueError:
                continue
            exists, owner = job_owner(engine, ref)
            if exists and not principal.can_see(owner):
                errors.append(error_item(["spec", field], f"no job with id {ref}"))
        if errors:
            raise SpecError(errors)
    responses_404: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorResponse}}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI for this API (pinned assets with Subresource Integrity; see service.security)."""
        return HTMLResponse(docs_html)

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": schemas.ErrorResponse}})
    def readyz(request: Request) -> JSONResponse:
        """The database answers and its schema is at the latest migration.

        Why the database is not ready (the driver's error, which names its socket path or host) is
        logged, and shown only to the local admin of authentication-off mode; an anonymous caller
        learns that it is not ready."""
        from service.migrate import head_revision

        try:
            with engine.connect() as c:
                exists = c.execute(text("SELECT to_regclass('alembic_version')")).scalar()
                current = c.execute(text("SELECT version_num FROM alembic_version")).scalar() if exists else None
        except Exception as e:
            first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
            reason = f"{type(e).__name__}: {first}"
            log.warning("readiness check: database not ready: %s", reason)
            shown = f"database not ready: {reason}" if principal_of(request).is_admin else "database not ready"
            return JSONResponse(status_code=503, headers={"Retry-After": "2"}, content={"detail": shown})
        head = head_revision()
        if current != head:
            return JSONResponse(
                status_code=503,
                content={
                    "detail": f"database schema at {current}, expected {head}: run `robust-ensembles db upgrade`"
                },
            )
        return JSONResponse({"status": "ready", "schema": current})

    # ------------------------------------------------------------------ jobs
    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=schemas.Job,
        tags=["jobs"],
        responses={**responses_422, 409: {"model": schemas.ErrorResponse}},
    )
    def submit_job(
        body: schemas.JobCreate,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        """Submit a job. The spec is validated and stored resolved; nothing is created on 422.

        With an ``Idempotency-Key`` header, a replay of the same request returns the job created
        the first time (header ``Idempotent-Replayed: true``); the same key with a different request
        is a 409. Keys are scoped to the caller's owner (another owner's key is another key); keys
        starting with ``trial:`` are reserved (422). An evaluate job naming a train job (``target_job``,
        ``transfer_from_job``, ``baseline_job``) waits for it (``depends_on``).
        """
        check_idempotency_key(idempotency_key)
        principal = principal_of(request)
        check_storable(body.spec, ["spec"])
        path_errors = server_path_errors(principal, body.kind, body.spec, ["spec"])
        if path_errors:
            raise SpecError(path_errors)
        resolved = validate_spec(body.kind, body.spec)
        check_references(principal, resolved)
        deps = resolve_references(queue, body.kind, resolved)
        resolve_model_references(model_store, principal, body.kind, resolved)
        try:
            job, created = queue.submit(
                body.kind,
                resolved,
                priority=body.priority,
                max_attempts=body.max_attempts,
                idempotency_key=idempotency_key,
                depends_on=deps,
                owner=principal.owner,
                deadline_seconds=body.deadline_seconds,
                tags=body.tags,
                note=body.note,
                gpus=job_gpus(body.kind, resolved),
            )
        except IdempotencyConflict as e:  # keys are scoped to their owner: this is the caller's own job
            raise HTTPException(status_code=409, detail=str(e)) from None
        response.headers["Location"] = f"/v1/jobs/{job['id']}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return _public(job)

    @app.get("/v1/jobs", response_model=schemas.JobList, tags=["jobs"], responses=responses_422)
    def list_jobs(
        request: Request,
        status: Annotated[list[str] | None, Query(description="repeat or comma-separate")] = None,
        kind: Annotated[list[str] | None, Query(description="repeat or comma-separate")] = None,
        parent_id: uuid.UUID | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        method: Annotated[list[str] | None, Query(description="train / tune jobs' method; repeat or comma-separate")
                          ] = None,
        dataset: Annotated[list[str] | None, Query(description="train / tune jobs' data set; repeat or "
                                                               "comma-separate")] = None,
        tag: Annotated[list[str] | None, Query(description="jobs with every one of these tags; repeat or "
                                                           "comma-separate")] = None,
        q: Annotated[str | None, Query(max_length=200, description="case-insensitive text in the job's id, note, "
                                                                   "tags, error, idempotency key or spec")] = None,
        since: Annotated[datetime | None, Query(description="created at or after (ISO 8601 date or time)")] = None,
        until: Annotated[datetime | None, Query(description="created before (ISO 8601 date or time)")] = None,
    ) -> dict[str, Any]:
        """Jobs, newest first. Trials (children of tune jobs) are listed with ``parent_id`` or ``kind=trial``.
        A user token lists its owner's jobs only; an admin token every job. Filters combine (AND); a
        filter's values (repeated or comma-separated) match any of them, except ``tag``: every tag."""
        statuses, kinds = _split_csv(status), _split_csv(kind)
        methods, datasets, tags = _split_csv(method), _split_csv(dataset), _split_csv(tag)
        filter_errors = list_filter_errors(methods, datasets, tags, q, since, until)
        if filter_errors:
            raise SpecError(filter_errors)
        bad = [s for s in statuses if s not in JOB_STATUSES]
        if bad:
            raise SpecError(
                [
                    error_item(
                        ["query", "status"],
                        f"unknown status {bad[0]!r}; expected one of {', '.join(JOB_STATUSES)}",
                    )
                ]
            )
        bad = [k for k in kinds if k not in ("train", "evaluate", "tune", "trial")]
        if bad:
            raise SpecError(
                [
                    error_item(
                        ["query", "kind"], f"unknown kind {bad[0]!r}; expected train, evaluate, tune or trial"
                    )
                ]
            )
        items, total = queue.list(
            status=statuses,
            kind=kinds,
            parent_id=parent_id,
            limit=limit,
            offset=offset,
            include_result=parent_id is not None,
            owner=principal_of(request).list_filter,
            method=methods,
            dataset=datasets,
            tags=tags,
            search=q,
            since=_aware(since),
            until=_aware(until),
        )
        return {"items": [_public(j) for j in items], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/jobs/{job_id}", response_model=schemas.Job, tags=["jobs"], responses=responses_404)
    def get_job(job_id: uuid.UUID) -> dict[str, Any]:
        """Status, progress (0..1), current stage/epoch, attempts, error and timestamps."""
        return _public(queue.get(job_id))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=schemas.Job,
        tags=["jobs"],
        responses={**responses_404, 409: {"model": schemas.ErrorResponse}},
    )
    def cancel_job(job_id: uuid.UUID) -> dict[str, Any]:
        """Queued: ``cancelled`` at once. Running: ``cancelling``; the worker stops the run within seconds
        and the job ends ``cancelled``. Already cancelling/cancelled: no change. Finished: 409."""
        try:
            return _public(queue.cancel(job_id))
        except InvalidTransition as e:
            raise HTTPException(status_code=409, detail=str(e)) from None

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_model=list[schemas.JobEvent],
        tags=["jobs"],
        responses=responses_404,
    )
    def job_events(job_id: uuid.UUID) -> list[dict[str, Any]]:
        """Every status transition of the job (audit trail)."""
        queue.get(job_id)
        return queue.events(job_id)

    @app.get(
        "/v1/jobs/{job_id}/trials", response_model=schemas.JobList, tags=["jobs"], responses=responses_404
    )
    def job_trials(
        job_id: uuid.UUID,
        limit: Annotated[int, Query(ge=1, le=500)] = 500,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        """The trials of a tune job (child jobs of kind ``trial``, with their latest metrics in ``result``)."""
        queue.get(job_id)
        items, total = queue.list(parent_id=job_id, limit=limit, offset=offset, include_result=True)
        return {"items": [_public(j) for j in items], "total": total, "limit": limit, "offset": offset}

    @app.get(
        "/v1/jobs/{job_id}/metrics", response_model=schemas.Metrics, tags=["results"], responses=responses_404
    )
    def job_metrics(
        job_id: uuid.UUID, name: Annotated[str | None, Query(max_length=200)] = None
    ) -> dict[str, Any]:
        """Time series points ``(name, step, value)``; for train jobs one point per metric per epoch."""
        if name is not None:
            check_storable(name, ["query", "name"])
        queue.get(job_id)
        points = queue.metrics(job_id, name)
        return {"job_id": job_id, "names": sorted({p["name"] for p in points}), "items": points}

    @app.get(
        "/v1/jobs/{job_id}/logs",
        tags=["results"],
        response_model=schemas.Logs,
        responses={
            **responses_404,
            200: {
                "content": {"application/json": {}, "text/event-stream": {}},
                "description": "JSON, or server-sent events with follow=true",
            },
        },
    )
    async def job_logs(
        request: Request,
        job_id: uuid.UUID,
        after: Annotated[int, Query(ge=0, le=MAX_LOG_ID, description="return lines with id > after")] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        follow: Annotated[
            bool, Query(description="stream as server-sent events until the job finishes")
        ] = False,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Any:
        """Log lines of the job. With ``follow=true``: ``text/event-stream``, one ``log`` event per line
        (``id`` = line id, so a reconnect with ``Last-Event-ID`` resumes), then one ``end`` event with the
        final status. The stream re-checks its token every few seconds: once the token is revoked it
        sends an ``error`` event and closes (a reconnect then gets 401)."""
        await run_in_threadpool(queue.get, job_id)
        if not follow:
            items = await run_in_threadpool(queue.logs, job_id, after=after, limit=limit)
            return {"job_id": job_id, "items": items, "next_after": items[-1]["id"] if items else after}
        start = after
        if last_event_id and last_event_id.isascii() and last_event_id.isdigit() and len(last_event_id) < 19:
            start = max(start, int(last_event_id))
        principal = principal_of(request)
        token_id = principal.token_id
        still_valid = None if token_id is None else (lambda: tokens.is_active(token_id))
        return StreamingResponse(
            _follow_logs(request, queue, job_id, start, still_valid),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/jobs/{job_id}/results",
        tags=["results"],
        responses={**responses_404, 409: {"model": schemas.ErrorResponse}},
    )
    def job_results(job_id: uuid.UUID) -> Any:
        """The job's final results JSON (train: metrics and method results; evaluate: the robustness table)."""
        job = queue.get(job_id)
        result = queue.result(job_id)
        if result is None:
            why = f": {job['error']}" if job.get("error") and job["status"] in TERMINAL_STATUSES else ""
            raise HTTPException(
                status_code=409, detail=f"job {job_id} is {job['status']}; it has no results{why}"
            )
        return result

    @app.get(
        "/v1/jobs/{job_id}/artifacts",
        response_model=schemas.Artifacts,
        tags=["results"],
        responses=responses_404,
    )
    def job_artifacts(job_id: uuid.UUID) -> dict[str, Any]:
        """Files the job wrote (train: ``ensemble.pt``, ``results.json``; evaluate: results and plots)."""
        queue.get(job_id)
        return {"job_id": job_id, "items": list_artifacts(settings.job_artifacts_dir(str(job_id)))}

    @app.get(
        "/v1/jobs/{job_id}/artifacts/{name:path}",
        tags=["results"],
        response_class=FileResponse,
        responses=responses_404,
    )
    def download_artifact(job_id: uuid.UUID, name: str) -> FileResponse:
        """Download one artifact. ``ensemble.pt`` loads with ``ensemble_core.checkpoint.load_ensemble``."""
        queue.get(job_id)
        path = safe_artifact_path(settings.job_artifacts_dir(str(job_id)), name)
        if path is None:
            shown = name if len(name) <= 120 else name[:120] + "..."
            raise HTTPException(status_code=404, detail=f"job {job_id} has no artifact {shown!r}")
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    # ------------------------------------------------------------------ methods
    @app.get("/v1/methods", response_model=schemas.Methods, tags=["methods"])
    def methods() -> dict[str, Any]:
        """Every registered training method with its hyperparameter schema, defaults and meanings."""
        from ensemble_core.methods import method_names

        return {"items": [describe_method(n) for n in method_names()]}

    @app.get("/v1/specs", tags=["methods"])
    def specs() -> dict[str, Any]:
        """The JSON schemas of a job submission (``POST /v1/jobs``): ``job``, the body's fields besides ``kind`` and
        ``spec`` (priority, max_attempts, deadline_seconds, tags, note); ``kinds``, the spec of each kind (train,
        evaluate, tune) with the registered methods, data sets, architectures and combine rules as enums. A
        method's ``hyperparameters`` are described by ``GET /v1/methods``. The dashboard's *New job* form is
        generated from these."""
        return describe_specs()

    @app.get("/v1/methods/{name}", tags=["methods"], responses=responses_404)
    def method(name: str) -> dict[str, Any]:
        """One method with its hyperparameter schema, defaults and meanings."""
        from ensemble_core.methods import method_names

        if name not in method_names():
            raise HTTPException(status_code=404, detail=f"unknown method {name!r}; expected one of "
                                                        f"{', '.join(method_names())}")
        return describe_method(name)

    @app.get("/v1/attacks", tags=["attacks"])
    def attacks() -> dict[str, Any]:
        """Every evaluation attack (evaluate jobs' ``attacks`` / ``transfer_attacks``): its threat model, losses and
        parameters with defaults and bounds (docs/evaluation.md)."""
        from ensemble_core.attack_catalog import attack_catalog

        return attack_catalog()

    @app.get("/v1/attacks/{name}", tags=["attacks"], responses=responses_404)
    def attack(name: str) -> dict[str, Any]:
        """One evaluation attack with its parameters."""
        from ensemble_core.attack_catalog import attack_catalog, attack_names

        if name not in attack_names():
            raise HTTPException(status_code=404, detail=f"unknown attack {name!r}; expected one of "
                                                        f"{', '.join(attack_names())}")
        return next(a for a in attack_catalog()["attacks"] if a["name"] == name)

    return app


def _warn_without_tokens(engine: Engine) -> None:
    try:
        if TokenStore(engine).count_active() == 0:
            log.warning("authentication is on and no API token exists: create one with "
                        "`robust-ensembles token create --owner NAME` (or set RE_AUTH=0 for local use)")
    except Exception as e:  # not migrated yet: /readyz says so
        log.warning("could not count API tokens: %s", e)


def _sse(event: str, payload: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(payload)}\n\n"


def _log_event(r: dict[str, Any]) -> str:
    payload = {"id": r["id"], "at": r["at"].isoformat(), "attempt": r["attempt"], "line": r["line"]}
    return _sse("log", payload, r["id"])


async def _follow_logs(request: Request, queue: Queue, job_id: uuid.UUID, after: int,
                       still_valid: Callable[[], bool] | None = None) -> AsyncIterator[str]:
    """The SSE stream of ``GET /v1/jobs/{id}/logs?follow=true``.

    ``still_valid`` (the request's token is not revoked) is re-checked every :data:`SSE_AUTH_RECHECK_SECONDS`:
    a revoked token's stream gets an ``error`` event and ends. A database outage ends the stream with an
    ``error`` event too (the client reconnects with ``Last-Event-ID``), never with a traceback in the log.
    """
    last = after
    idle = 0.0
    next_check = time.monotonic() + SSE_AUTH_RECHECK_SECONDS
    try:
        while True:
            if await request.is_disconnected():
                return
            if still_valid is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + SSE_AUTH_RECHECK_SECONDS
                if not await run_in_threadpool(still_valid):
                    yield _sse("error", {"detail": "invalid or revoked API token"})
                    return
            rows = await run_in_threadpool(queue.logs, job_id, after=last, limit=1000)
            for r in rows:
                last = r["id"]
                yield _log_event(r)
            if rows:
                idle = 0.0
                continue
            job = await run_in_threadpool(queue.get, job_id)
            if job["status"] in TERMINAL_STATUSES:
                # lines written just before the final transition are already visible: one more read
                tail = await run_in_threadpool(queue.logs, job_id, after=last, limit=10_000)
                for r in tail:
                    last = r["id"]
                    yield _log_event(r)
                yield _sse("end", {"status": job["status"], "error": job.get("error")})
                return
            await asyncio.sleep(SSE_POLL_SECONDS)
            idle += SSE_POLL_SECONDS
            if idle >= SSE_KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keep-alive\n\n"
    except (OperationalError, InterfaceError) as e:
        reason = str(getattr(e, "orig", e)).strip().split("\n", 1)[0] or type(e).__name__
        log.warning("log stream of job %s ended: database unavailable: %s", job_id, reason)
        yield _sse("error", {"detail": "database unavailable; reconnect with Last-Event-ID"})
