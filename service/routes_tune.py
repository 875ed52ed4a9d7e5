"""Routes specific to tune jobs: start a full train job from a finished search's best configuration,
and read a multi-objective search's Pareto front.

``POST /v1/jobs/{job_id}/train-best`` reads the tune job's result (``best.train_spec``: the search's
base train spec with the best trial's values, written by :mod:`workers.ray_tune`), applies optional
``overrides`` (e.g. more epochs, more workers), validates it like any train submission and queues it.
The trials themselves are child jobs (``GET /v1/jobs/{job_id}/trials``); the best trial's checkpoint
is the tune job's artifact ``best_trial.pt``.

``GET /v1/jobs/{job_id}/pareto`` serves the Pareto front a multi-objective search (``metrics``) recorded
in its result: the non-dominated trials with their configs and last metric values, the plot's artifact
(``pareto_front.png``) and, for an Optuna search, the parameter importance of each objective.

Wire it into the app with :func:`register_tune_routes` (no torch is imported here).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service import schemas
from service.auth import principal_of, server_path_errors
from service.limits import check_idempotency_key, check_storable
from service.queue import IdempotencyConflict, Queue
from service.submission import SpecError, validate_spec

TRAIN_BEST_PATH = "/v1/jobs/{job_id}/train-best"
PARETO_PATH = "/v1/jobs/{job_id}/pareto"


class ParetoTrial(BaseModel):
    trial_id: str
    config: dict[str, Any] = Field(description="the trial's searched values")
    values: dict[str, float] = Field(description="its last reported value of each metric")
    epochs_done: int | None = None


class ParetoFront(BaseModel):
    """The non-dominated trials of a multi-objective search, on their last reported metric values."""

    job_id: uuid.UUID
    metrics: list[str]
    modes: list[str]
    trials: list[ParetoTrial] = Field(description="the front, best first on the first metric")
    candidates: int = Field(description="trials compared (those that ran every epoch, if any did, and "
                                        "reported every metric)")
    excluded: list[str] = Field(description="trials left out: a metric missing, or unfinished")
    plot: str | None = Field(description="artifact path of the PNG (every trial, the front joined), "
                                         "or null when it could not be drawn")
    plot_url: str | None = None
    param_importance: dict[str, dict[str, float]] | None = Field(
        None, description="Optuna's importance of each searched parameter, per metric")
    param_importance_reason: str | None = Field(None, description="why there is no importance")


class TrainFromBest(BaseModel):
    """Optional changes to the best configuration's train spec."""

    model_config = ConfigDict(extra="forbid")

    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="train-spec keys to change, e.g. {'epochs': 20, 'workers': 2}; 'optimizer' and "
        "'hyperparameters' are merged key by key")
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")
    max_attempts: int | None = Field(None, ge=1, le=100)


def merge_overrides(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides``; nested dicts (optimizer, schedule, hyperparameters) merge one level."""
    out = dict(spec)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def register_tune_routes(app: FastAPI, queue: Queue) -> None:
    """Add the tune routes to ``app`` (once)."""
    if any(getattr(r, "path", None) == TRAIN_BEST_PATH for r in app.routes):
        return

    @app.post(
        TRAIN_BEST_PATH,
        status_code=201,
        response_model=schemas.Job,
        tags=["jobs"],
        responses={404: {"model": schemas.ErrorResponse}, 409: {"model": schemas.ErrorResponse},
                   422: {"model": schemas.ValidationErrorResponse}},
    )
    def train_from_best(
        job_id: uuid.UUID,
        request: Request,
        response: Response,
        body: TrainFromBest | None = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        """Queue a train job with the best configuration of a succeeded tune job (one call).

        The spec is the search's base train spec with the best trial's values (its own ``val_size``,
        not the search's held-out split), plus ``overrides``. 409 when the job is not a succeeded
        tune job; 422 naming ``overrides.<field>`` when the overrides make the spec invalid.
        """
        body = body or TrainFromBest()
        principal = principal_of(request)  # the app's auth dependency already hid other owners' jobs (404)
        check_idempotency_key(idempotency_key)
        check_storable(body.overrides, ["overrides"])
        path_errors = server_path_errors(principal, "train", body.overrides, ["overrides"])
        if path_errors:
            raise SpecError(path_errors)
        job = queue.get(job_id)
        if job["kind"] != "tune":
            raise HTTPException(status_code=409,
                                detail=f"job {job_id} is a {job['kind']} job; only a tune job has a best "
                                       f"configuration")
        if job["status"] != "succeeded":
            raise HTTPException(status_code=409,
                                detail=f"tune job {job_id} is {job['status']}; a train job can start from "
                                       f"its best configuration once it succeeded")
        best = (queue.result(job_id) or {}).get("best") or {}
        train_spec = best.get("train_spec")
        if not isinstance(train_spec, dict):
            raise HTTPException(status_code=409, detail=f"tune job {job_id} recorded no best configuration")
        try:
            resolved = validate_spec("train", merge_overrides(train_spec, body.overrides))
        except SpecError as e:
            for item in e.errors:  # the caller wrote overrides, not a spec: name their fields
                if item["loc"][:1] == ["spec"]:
                    item["loc"] = ["overrides", *item["loc"][1:]]
                    item["field"] = ".".join(str(p) for p in item["loc"])
            raise
        try:
            new, created = queue.submit("train", resolved, priority=body.priority,
                                        max_attempts=body.max_attempts, idempotency_key=idempotency_key,
                                        owner=principal.owner)
        except IdempotencyConflict as e:  # keys are scoped to their owner: this is the caller's own job
            raise HTTPException(status_code=409, detail=str(e)) from None
        response.headers["Location"] = f"/v1/jobs/{new['id']}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return {k: v for k, v in new.items() if k not in ("seq", "request_hash")}

    @app.get(
        PARETO_PATH,
        response_model=ParetoFront,
        tags=["results"],
        responses={404: {"model": schemas.ErrorResponse}, 409: {"model": schemas.ErrorResponse}},
    )
    def pareto_front(job_id: uuid.UUID) -> dict[str, Any]:
        """The Pareto front of a succeeded multi-objective tune job (``metrics`` in its spec).

        409 when the job is not a tune job, has not succeeded, or searched on a single metric.
        """
        job = queue.get(job_id)  # the app's auth dependency already hid other owners' jobs (404)
        if job["kind"] != "tune":
            raise HTTPException(status_code=409,
                                detail=f"job {job_id} is a {job['kind']} job; only a tune job has a Pareto front")
        if job["status"] != "succeeded":
            raise HTTPException(status_code=409,
                                detail=f"tune job {job_id} is {job['status']}; its Pareto front is there once "
                                       f"it succeeded")
        result = queue.result(job_id) or {}
        front = result.get("pareto_front")
        if not isinstance(front, dict):
            metric = (job.get("spec") or {}).get("metric")
            raise HTTPException(status_code=409,
                                detail=f"tune job {job_id} searched on one metric ({metric}); a Pareto front "
                                       f"needs a multi-objective search ('metrics' with search_alg 'optuna')")
        plot = front.get("plot")
        return {**front, "job_id": job_id, "plot": plot,
                "plot_url": f"/v1/jobs/{job_id}/artifacts/{plot}" if plot else None,
                "param_importance": result.get("param_importance"),
                "param_importance_reason": result.get("param_importance_reason")}


__all__ = ["PARETO_PATH", "TRAIN_BEST_PATH", "ParetoFront", "TrainFromBest", "merge_overrides",
           "register_tune_routes"]
