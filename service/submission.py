"""Validation of submitted specs and of the jobs they reference.

A spec is validated by ``ensemble_core.spec.SPEC_MODELS[kind]`` (the same pydantic model the worker
and the library use) and stored resolved. Errors become HTTP 422 entries whose ``field`` names the
offending key in the request body, e.g. ``spec.hyperparameters.zeta``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from service.queue import JobNotFound, Queue

# EvaluateSpec fields that name a train job whose ensemble the evaluation needs.
JOB_REFERENCES = ("target_job", "transfer_from_job", "baseline_job")
# EvaluateSpec fields that name a registered model (service.model_registry).
MODEL_REFERENCES = ("target_model", "transfer_from_model", "baseline_model")


class SpecError(Exception):
    """One or more problems in a submission; ``errors`` are ready for the 422 body."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['msg']}" for e in errors))
        self.errors = errors


def error_item(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> dict[str, Any]:
    return {"loc": list(loc), "field": ".".join(str(p) for p in loc), "msg": msg, "type": type_}


MAX_ERRORS = 50  # a 422 lists at most this many errors, then one item counting the rest


def cap_errors(items: list[dict[str, Any]], limit: int = MAX_ERRORS, *, total: int | None = None
               ) -> list[dict[str, Any]]:
    """The first ``limit`` error items, plus one saying how many more there were (a 422 stays small
    however many errors an invalid body has). ``total``: the number of errors when ``items`` holds only
    the first of them."""
    if items and items[-1].get("type") == "too_many_errors" and len(items) <= limit + 1:
        return items  # capped already
    total = len(items) if total is None else max(total, len(items))
    if total <= limit:
        return items
    rest = total - limit
    return [*items[:limit], error_item(["body"], f"... and {rest} more errors (only the first {limit} are listed)",
                                       "too_many_errors")]


def _guess_field(msg: str, model: type[BaseModel] | None) -> list[str]:
    """Model-level validators report problems without a location; find the field their message names."""
    if model is None:
        return []
    fields = set(model.model_fields)
    text = msg.removeprefix("Value error, ")
    first = re.match(r"([A-Za-z_][\w.]*)", text)
    if first and first.group(1).split(".")[0] in fields:
        return first.group(1).split(".")
    for word in re.findall(r"[A-Za-z_]\w*", text):
        if word in fields:
            return [word]
    return []


def pydantic_errors(
    err: ValidationError, prefix: Sequence[str | int], model: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    out = []
    errors = err.errors(include_url=False)
    for e in errors[:MAX_ERRORS]:
        loc = list(e["loc"]) or _guess_field(e["msg"], model)
        out.append(error_item([*prefix, *loc], e["msg"].removeprefix("Value error, "), e["type"]))
    return cap_errors(out, total=len(errors))


def validate_spec(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The resolved spec (every default filled in), or :class:`SpecError`."""
    from ensemble_core.spec import SPEC_MODELS, TrainSpec

    model = SPEC_MODELS.get(kind)
    if model is None:
        raise SpecError(
            [
                error_item(
                    ["kind"], f"unknown job kind {kind!r}; expected one of {', '.join(sorted(SPEC_MODELS))}"
                )
            ]
        )
    try:
        parsed = model.model_validate(spec)
    except ValidationError as e:
        raise SpecError(pydantic_errors(e, ["spec"], model)) from None
    resolved: dict[str, Any] = parsed.resolved()  # type: ignore[attr-defined]
    if kind == "tune":  # the base of a search is a train spec: validate it too, where it is
        try:
            resolved["base"] = TrainSpec.model_validate(resolved["base"]).resolved()
        except ValidationError as e:
            raise SpecError(pydantic_errors(e, ["spec", "base"], TrainSpec)) from None
    return resolved


def resolve_references(queue: Queue, kind: str, resolved: dict[str, Any]) -> list[uuid.UUID]:
    """Check the train jobs an evaluation names; they become its dependencies (``depends_on``)."""
    if kind != "evaluate":
        return []
    deps: list[uuid.UUID] = []
    errors: list[dict[str, Any]] = []
    for field in JOB_REFERENCES:
        ref = resolved.get(field)
        if ref is None:
            continue
        loc = ["spec", field]
        try:
            job_id = uuid.UUID(str(ref))
        except ValueError:
            errors.append(error_item(loc, f"{ref!r} is not a job id (a UUID)"))
            continue
        try:
            job = queue.get(job_id)
        except JobNotFound:
            errors.append(error_item(loc, f"no job with id {job_id}"))
            continue
        if job["kind"] != "train":
            errors.append(error_item(loc, f"job {job_id} is a {job['kind']} job; expected a train job"))
        elif job["status"] in ("failed", "cancelled"):
            errors.append(error_item(loc, f"train job {job_id} ended {job['status']}; it has no ensemble"))
        else:
            resolved[field] = str(job_id)  # canonical form
            deps.append(job_id)
    if errors:
        raise SpecError(errors)
    return deps


def resolve_model_references(store: Any, principal: Any, kind: str, resolved: dict[str, Any]) -> None:
    """Check the registered models an evaluation names: each must exist and be visible to ``principal``
    (another owner's model reads as missing). Ids are stored in canonical form; :class:`SpecError` otherwise."""
    if kind != "evaluate":
        return
    errors: list[dict[str, Any]] = []
    for field in MODEL_REFERENCES:
        ref = resolved.get(field)
        if ref is None:
            continue
        loc = ["spec", field]
        try:
            model_id = uuid.UUID(str(ref))
        except ValueError:
            errors.append(error_item(loc, f"{str(ref)[:80]!r} is not a model id (a UUID)"))
            continue
        if not store.visible(model_id, principal):
            errors.append(error_item(loc, f"no model with id {model_id}"))
        else:
            resolved[field] = str(model_id)
    if errors:
        raise SpecError(errors)
