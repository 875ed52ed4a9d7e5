"""Webhook subscriptions and their delivery log over REST (docs/webhooks.md, :mod:`service.webhooks`).

- ``POST /v1/webhooks``: subscribe a URL to events (job transitions, ``metric.threshold`` with thresholds);
  the answer holds the signing ``secret``, shown this once;
- ``GET /v1/webhooks``, ``GET``/``PATCH``/``DELETE /v1/webhooks/{webhook_id}``;
- ``POST /v1/webhooks/{webhook_id}/rotate-secret``: a new secret (shown once), the old one stops signing;
- ``POST /v1/webhooks/{webhook_id}/ping``: queue a test event;
- ``GET /v1/webhooks/{webhook_id}/deliveries``: the delivery log (status, attempts, answers, errors).

URLs are checked when subscribed (http/https, no credentials, a host whose every address the policy allows:
422 naming ``url`` otherwise) and again at every delivery. A subscription belongs to the caller's owner; any
other owner gets 404, as for a missing one. Nothing is ever sent from a request: the workers deliver.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service import schemas
from service.auth import principal_of
from service.settings import Settings
from service.submission import SpecError, error_item
from service.webhooks import EVENTS, WebhookNotFound, WebhookStore, check_url, url_problem

WEBHOOKS_PATH = "/v1/webhooks"
MAX_THRESHOLDS = 16
MAX_EVENTS = len(EVENTS)
Event = Literal[EVENTS]  # type: ignore[valid-type]


class Threshold(BaseModel):
    """A metric threshold: ``metric.threshold`` is sent the first time a job's point of ``metric`` meets it."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:/-]+$",
                        description="a per-epoch metric name, e.g. val_clean_acc, train_loss, val_robust_acc")
    op: Literal[">=", ">", "<=", "<"] = Field(description="how the value compares with the threshold")
    value: float = Field(description="the threshold (finite)")

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


def _valid_url(v: str | None) -> str | None:
    problem = None if v is None else url_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class WebhookCreate(BaseModel):
    """A subscription."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "url": "https://hooks.example.com/robust-ensembles", "events": ["job.succeeded", "job.failed",
                                                                       "metric.threshold"],
        "thresholds": [{"metric": "val_clean_acc", "op": ">=", "value": 0.98}], "description": "my runs"}]})

    url: str = Field(max_length=2000, description="http(s) URL without credentials; its host must resolve to "
                     "public addresses (private ones only with RE_WEBHOOK_ALLOW_PRIVATE=1)")
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS, description="job.<transition> (job.* for "
                                "all) and metric.threshold")
    thresholds: list[Threshold] = Field(default_factory=list, max_length=MAX_THRESHOLDS)
    description: str | None = Field(None, max_length=500)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str | None:
        return _valid_url(v)

    @field_validator("description")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return schemas.check_note(v)


class WebhookUpdate(BaseModel):
    """Changes to a subscription (fields left out stay)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2000)
    events: list[Event] | None = Field(None, min_length=1, max_length=MAX_EVENTS)
    thresholds: list[Threshold] | None = Field(None, max_length=MAX_THRESHOLDS)
    description: str | None = Field(None, max_length=500)
    active: bool | None = Field(None, description="false pauses deliveries (events are kept and sent on resume)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _valid_url(v)

    @field_validator("description")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return schemas.check_note(v)


class Webhook(BaseModel):
    id: uuid.UUID
    owner: str | None
    url: str
    events: list[str]
    thresholds: list[dict[str, Any]]
    description: str | None
    active: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(Webhook):
    secret: str = Field(description="HMAC-SHA256 signing secret: shown only in this answer (and on rotation)")


class WebhookList(BaseModel):
    items: list[Webhook]


class Delivery(BaseModel):
    id: int
    webhook_id: uuid.UUID
    event: str
    job_id: uuid.UUID | None
    payload: dict[str, Any]
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    history: list[dict[str, Any]] = Field(description="every attempt: time, HTTP status, error, duration")
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[Delivery]
    total: int
    limit: int
    offset: int


def _not_found(webhook_id: object) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no webhook with id {webhook_id}")


def register_webhook_routes(app: FastAPI, settings: Settings, store: WebhookStore) -> None:
    """Add the routes to ``app`` (once)."""
    if any(getattr(r, "path", None) == WEBHOOKS_PATH for r in app.routes):
        return
    responses_404: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorResponse}}
    responses_422: dict[int | str, dict[str, Any]] = {422: {"model": schemas.ValidationErrorResponse}}

    def visible(request: Request, webhook_id: uuid.UUID) -> dict[str, Any]:
        p = principal_of(request)
        try:
            return store.get(webhook_id, p.owner, admin=p.is_admin)
        except WebhookNotFound:
            raise _not_found(webhook_id) from None

    async def check_target(url: str) -> None:
        """The host's addresses under the policy (resolved off the event loop); 422 naming ``url``."""
        problem = await run_in_threadpool(check_url, url, settings.webhook_allow_private)
        if problem:
            raise SpecError([error_item(["url"], problem)])

    @app.post(WEBHOOKS_PATH, status_code=201, response_model=WebhookCreated, tags=["webhooks"],
              responses=responses_422)
    async def create_webhook(request: Request, body: WebhookCreate) -> dict[str, Any]:
        """Subscribe a URL. The answer's ``secret`` signs every delivery (``X-RE-Signature``) and is not shown
        again. 422 naming the field for a bad URL (scheme, credentials, an address the policy refuses), unknown
        events, or thresholds without the ``metric.threshold`` event."""
        if body.thresholds and "metric.threshold" not in body.events:
            raise SpecError([error_item(["events"], "thresholds are sent as the event metric.threshold: add it")])
        if "metric.threshold" in body.events and not body.thresholds:
            raise SpecError([error_item(["thresholds"], "the event metric.threshold needs at least one threshold")])
        await check_target(body.url)
        return await run_in_threadpool(store.create, principal_of(request).owner, body.url, list(body.events),
                                       [t.model_dump() for t in body.thresholds], body.description)

    @app.get(WEBHOOKS_PATH, response_model=WebhookList, tags=["webhooks"])
    def list_webhooks(request: Request) -> dict[str, Any]:
        """The caller's subscriptions (an admin's: every owner's). Secrets are never listed."""
        p = principal_of(request)
        return {"items": store.list(p.owner, admin=p.is_admin)}

    @app.get(WEBHOOKS_PATH + "/{webhook_id}", response_model=Webhook, tags=["webhooks"], responses=responses_404)
    def get_webhook(request: Request, webhook_id: uuid.UUID) -> dict[str, Any]:
        """One subscription (without its secret)."""
        return visible(request, webhook_id)

    @app.patch(WEBHOOKS_PATH + "/{webhook_id}", response_model=Webhook, tags=["webhooks"],
               responses={**responses_404, **responses_422})
    async def update_webhook(request: Request, webhook_id: uuid.UUID, body: WebhookUpdate) -> dict[str, Any]:
        """Change a subscription; ``active: false`` pauses it (its events wait, and are sent once it is active)."""
        current = await run_in_threadpool(visible, request, webhook_id)
        changes = {k: getattr(body, k) for k in body.model_fields_set}
        for key in ("url", "events", "active"):
            if key in changes and changes[key] is None:
                raise SpecError([error_item([key], "may not be null")])
        if "thresholds" in changes:
            changes["thresholds"] = [t.model_dump() for t in changes["thresholds"] or []]
        events = changes.get("events", current["events"])
        thresholds = changes.get("thresholds", current["thresholds"])
        if thresholds and "metric.threshold" not in events:
            raise SpecError([error_item(["events"], "thresholds are sent as the event metric.threshold: add it")])
        if "metric.threshold" in events and not thresholds:
            raise SpecError([error_item(["thresholds"], "the event metric.threshold needs at least one threshold")])
        if "url" in changes:
            await check_target(changes["url"])
        if not changes:
            return current
        return await run_in_threadpool(store.update, webhook_id, changes)

    @app.delete(WEBHOOKS_PATH + "/{webhook_id}", response_model=Webhook, tags=["webhooks"], responses=responses_404)
    def delete_webhook(request: Request, webhook_id: uuid.UUID) -> dict[str, Any]:
        """Delete a subscription and its delivery log."""
        row = visible(request, webhook_id)
        store.delete(webhook_id)
        return row

    @app.post(WEBHOOKS_PATH + "/{webhook_id}/rotate-secret", response_model=WebhookCreated, tags=["webhooks"],
              responses=responses_404)
    def rotate_secret(request: Request, webhook_id: uuid.UUID) -> dict[str, Any]:
        """A new signing secret, shown in this answer only; deliveries from now on are signed with it."""
        visible(request, webhook_id)
        return store.rotate_secret(webhook_id)

    @app.post(WEBHOOKS_PATH + "/{webhook_id}/ping", status_code=202, response_model=Delivery, tags=["webhooks"],
              responses=responses_404)
    def ping_webhook(request: Request, webhook_id: uuid.UUID) -> dict[str, Any]:
        """Queue a ``ping`` event for the subscription (delivered by a worker like any other)."""
        row = visible(request, webhook_id)
        return store.enqueue(webhook_id, "ping", {"event": "ping", "webhook": str(row["id"]),
                                                  "at": datetime.now().astimezone().isoformat()})

    @app.get(WEBHOOKS_PATH + "/{webhook_id}/deliveries", response_model=DeliveryList, tags=["webhooks"],
             responses={**responses_404, **responses_422})
    def webhook_deliveries(
        request: Request,
        webhook_id: uuid.UUID,
        status: Literal["pending", "delivered", "failed"] | None = None,
        event: Annotated[str | None, Query(max_length=50)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> dict[str, Any]:
        """The delivery log, newest first: each event's payload, status (pending, delivered, failed), attempts,
        the last answer or error, and every attempt in ``history``."""
        visible(request, webhook_id)
        if event is not None and event not in (*EVENTS, "ping"):
            raise SpecError([error_item(["query", "event"], f"unknown event {event[:50]!r}")])
        items, total = store.deliveries(webhook_id, status=status, event=event, limit=limit, offset=offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}


__all__ = ["Delivery", "Threshold", "Webhook", "WebhookCreate", "WebhookUpdate", "register_webhook_routes"]
