"""The model registry's routes: upload, register, list, show, delete and export ensembles (docs/models.md).

- ``POST /v1/models``: multipart upload of member weights as safetensors (never pickle) with the architecture,
  data set, combine rule, input range and normalisation; validated (tensor names and shapes, a forward pass on
  real test images) before anything is stored;
- ``POST /v1/jobs/{job_id}/register``: a succeeded train job's ensemble as a model;
- ``GET /v1/models``, ``GET /v1/models/{model_id}``, ``DELETE /v1/models/{model_id}``,
  ``GET /v1/models/{model_id}/evaluations``;
- ``GET /v1/models/{model_id}/export/robustbench``: a RobustBench ``model_info`` record of an evaluation;
- ``GET /v1/models/{model_id}/export/huggingface`` and ``.../huggingface/{name}``: the Hugging Face-layout folder
  (``config.json``, ``model.safetensors``, ``README.md`` with the evaluations and the training spec).

Refusals: 422 naming the field, 413 over ``Settings.max_model_bytes`` (the body size middleware), 409 for a
name and version the owner has already; nothing is stored on any of them. Another owner's model is 404 on
every route. Torch is imported on the first request that needs it (validation, registration), never at start-up.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import schemas
from service.auth import principal_of
from service.limits import check_storable
from service.model_registry import (
    ModelConflict,
    ModelNotFound,
    ModelStore,
    name_problem,
    tags_problem,
    version_problem,
)
from service.queue import Queue
from service.submission import SpecError, error_item, pydantic_errors

MODELS_PATH = "/v1/models"
REGISTER_PATH = "/v1/jobs/{job_id}/register"
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")
MAX_TEXT = 64 * 1024  # the free-text training description of an upload


class PaperInfo(BaseModel):
    """Where a model comes from, for its model card and RobustBench record (all optional)."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=300, description="the paper's title (RobustBench's 'name')")
    link: str | None = Field(None, max_length=500, pattern=r"^https?://\S+$", description="a URL of the paper")
    authors: str | None = Field(None, max_length=500, description="'First Author, Second Author'")
    venue: str | None = Field(None, max_length=200, description="e.g. 'ICLR 2024'")
    architecture: str | None = Field(None, max_length=100, description="as the paper names it (default: ours)")
    reported: float | None = Field(None, ge=0, le=1, description="the paper's robust accuracy, a fraction")
    additional_data: bool = Field(False, description="trained with data beyond the data set's training split")


class RegisterModel(BaseModel):
    """A name, version and tags for a train job's ensemble."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="letters, digits, '.', '_', '-'; no path")
    version: str = Field("1", min_length=1, max_length=32)
    tags: list[str] = Field(default_factory=list, max_length=16)
    paper: PaperInfo | None = None


class Model(BaseModel):
    """A registered model."""

    id: uuid.UUID
    owner: str | None
    name: str
    version: str
    tags: list[str]
    source: Literal["upload", "train_job"]
    source_job_id: uuid.UUID | None
    architecture: str
    dataset: str
    combine: str
    members: int
    size_bytes: int = Field(description="of model.safetensors")
    sha256: str = Field(description="of model.safetensors")
    created_at: datetime
    config: dict[str, Any] = Field(description="config.json: architecture, input, training spec, validation, paper")


class ModelList(BaseModel):
    items: list[Model]
    total: int
    limit: int
    offset: int


class ExportFile(BaseModel):
    name: str
    size: int | None


class ExportListing(BaseModel):
    model_id: uuid.UUID
    files: list[ExportFile]


def _not_found(model_id: object) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no model with id {model_id}")


def _csv(raw: str | None) -> list[str]:
    return [t.strip() for t in (raw or "").split(",") if t.strip()]


def _floats(field: str, raw: str | None, count: int | None = None) -> list[float] | None:
    """``"0,1"`` or ``"[0, 1]"`` as numbers; :class:`SpecError` naming ``field`` otherwise."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    try:
        values = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError
    except (ValueError, TypeError):
        raise SpecError([error_item([field], f"expected comma-separated numbers, got {text[:80]!r}")]) from None
    if not values or len(values) > 3 or (count is not None and len(values) != count):
        raise SpecError([error_item([field], f"expected {count or '1 to 3'} numbers, got {len(values)}")])
    return [float(v) for v in values]


def _json_object(field: str, raw: str | None) -> dict[str, Any] | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise SpecError([error_item([field], "expected a JSON object")]) from None
    if not isinstance(value, dict):
        raise SpecError([error_item([field], "expected a JSON object")])
    check_storable(value, [field])
    return value


def _identity_errors(name: str, version: str, tags: list[str], prefix: list[str | int]) -> list[dict[str, Any]]:
    errors = []
    for field, problem in (("name", name_problem(name)), ("version", version_problem(version)),
                           ("tags", tags_problem(tags))):
        if problem:
            errors.append(error_item([*prefix, field], problem))
    return errors


def _upload_errors(e: Any) -> SpecError:
    return SpecError([error_item([field], msg) for field, msg in e.problems])


def register_model_routes(app: FastAPI, queue: Queue, store: ModelStore) -> None:
    """Add the registry's routes to ``app`` (once)."""
    if any(getattr(r, "path", None) == MODELS_PATH for r in app.routes):
        return
    responses_404: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorResponse}}
    responses_422: dict[int | str, dict[str, Any]] = {422: {"model": schemas.ValidationErrorResponse}}

    def visible_model(request: Request, model_id: uuid.UUID) -> dict[str, Any]:
        try:
            return store.get(model_id, principal_of(request))
        except ModelNotFound:
            raise _not_found(model_id) from None

    @app.post(MODELS_PATH, status_code=201, response_model=Model, tags=["models"],
              responses={**responses_422, 409: {"model": schemas.ErrorResponse},
                         413: {"model": schemas.ErrorResponse}})
    def upload_model(
        request: Request,
        name: Annotated[str, Form(max_length=100, description="letters, digits, '.', '_', '-'; no path")],
        architecture: Annotated[str, Form(max_length=100, description="a registered architecture (lenet5, ...)")],
        dataset: Annotated[str, Form(max_length=50, description="mnist, fashion_mnist, cifar10, cifar100")],
        weights: Annotated[list[UploadFile], File(
            description="safetensors files: one per member (its state_dict), or one holding every member under "
                        "members.<i>.<name>")],
        version: Annotated[str, Form(max_length=32)] = "1",
        tags: Annotated[str, Form(max_length=1000, description="comma-separated")] = "",
        combine: Annotated[str, Form(max_length=64, description="the deployed combine rule")] = "mean_logits",
        input_range: Annotated[str, Form(max_length=100, description="pixel range the members were trained on, "
                                                                    "'0,1' (default), '0,255' or '-1,1'")] = "0,1",
        mean: Annotated[str | None, Form(max_length=200, description="normalisation mean, 1 or C values "
                                                                    "(default none)")] = None,
        std: Annotated[str | None, Form(max_length=200, description="normalisation std (default none)")] = None,
        architecture_kwargs: Annotated[str | None, Form(max_length=2000, description="JSON object")] = None,
        training: Annotated[str | None, Form(max_length=MAX_TEXT, description="how it was trained (text or a "
                                                                              "JSON object)")] = None,
        paper: Annotated[str | None, Form(max_length=5000, description="JSON object: title, link, authors, "
                                                                       "venue, architecture, reported, "
                                                                       "additional_data")] = None,
    ) -> dict[str, Any]:
        """Upload an ensemble trained elsewhere. Weights are safetensors only (a pickle or ``torch.save`` /
        ``.pt2`` file is refused); each member's tensors must be the architecture's, by name and shape; a
        forward pass on real test images of the data set must give finite ``(N, classes)`` outputs. 422 names
        the field, 413 over the size limit, 409 for an existing name and version; nothing is stored then."""
        principal = principal_of(request)
        for field, value in (("name", name), ("architecture", architecture), ("dataset", dataset),
                             ("version", version), ("tags", tags), ("combine", combine),
                             ("training", training or "")):
            check_storable(value, [field])
        tag_list = _csv(tags)
        errors = _identity_errors(name, version, tag_list, [])
        from ensemble_core.spec import DATASET_ALIASES, DATASETS

        ds = DATASET_ALIASES.get(dataset.lower(), dataset.lower())
        if ds not in DATASETS:
            errors.append(error_item(["dataset"], f"unknown dataset {dataset!r}; expected one of "
                                                  f"{', '.join(DATASETS)}"))
        from ensemble_core.registry_names import architecture_names, combine_names

        if architecture not in architecture_names():
            errors.append(error_item(["architecture"], f"unknown architecture {architecture!r}; expected one of "
                                                       f"{', '.join(architecture_names())}"))
        if combine not in combine_names():
            errors.append(error_item(["combine"], f"unknown combine rule {combine!r}; expected one of "
                                                  f"{', '.join(combine_names())}"))
        paper_info: dict[str, Any] | None = None
        try:
            rng = _floats("input_range", input_range, 2)
            mean_v, std_v = _floats("mean", mean), _floats("std", std)
            kwargs = _json_object("architecture_kwargs", architecture_kwargs) or {}
            raw_paper = _json_object("paper", paper)
            if raw_paper is not None:
                paper_info = PaperInfo.model_validate(raw_paper).model_dump(exclude_none=True)
        except SpecError as e:
            errors += e.errors
        except ValidationError as e:
            errors += pydantic_errors(e, ["paper"], PaperInfo)
        from ensemble_core.spec import MAX_MEMBERS

        if not weights:
            errors.append(error_item(["weights"], "no weights file"))
        elif len(weights) > MAX_MEMBERS:
            errors.append(error_item(["weights"], f"{len(weights)} files; at most {MAX_MEMBERS} (one per member)"))
        if errors:
            raise SpecError(errors)
        train_desc: Any = training
        if training and training.strip().startswith("{"):
            train_desc = _json_object("training", training)

        from ensemble_core import registry_io

        try:
            arch = registry_io.member_arch(architecture, ds, input_range=rng or (0.0, 1.0), mean=mean_v, std=std_v,
                                           kwargs=kwargs)
            files = [registry_io.parse_safetensors(f.file.read(), "weights") for f in weights]
            members = registry_io.split_members(files)
            _, canon, report = registry_io.validate_members(arch, members, combine, ds)
        except registry_io.UploadError as e:
            raise _upload_errors(e) from None
        config = registry_io.make_config(
            arch, ds, combine, len(canon), input_range=rng or (0.0, 1.0), mean=mean_v, std=std_v,
            training=train_desc, source={"kind": "upload", "files": len(weights)}, paper=paper_info,
            validation=report.to_dict())
        try:
            return store.create(owner=principal.owner, name=name, version=version, tags=tag_list, source="upload",
                                source_job_id=None, config=config, members=canon)
        except ModelConflict as e:
            raise HTTPException(status_code=409, detail=str(e)) from None

    @app.post(REGISTER_PATH, status_code=201, response_model=Model, tags=["models"],
              responses={**responses_404, **responses_422, 409: {"model": schemas.ErrorResponse}})
    def register_job(job_id: uuid.UUID, body: RegisterModel, request: Request) -> dict[str, Any]:
        """Register a succeeded train job's ensemble as a model (its ``ensemble.pt`` converted to safetensors;
        its resolved train spec kept as the model's training spec). The model belongs to the job's owner.
        409 when the job is not a succeeded train job or the name and version exist."""
        check_storable(body.model_dump(), [])
        errors = _identity_errors(body.name, body.version, body.tags, [])
        if errors:
            raise SpecError(errors)
        job = queue.get(job_id)  # the app's auth dependency already answered 404 for another owner's job
        if job["kind"] != "train":
            raise HTTPException(status_code=409, detail=f"job {job_id} is a {job['kind']} job; only a train job's "
                                                        "ensemble can be registered")
        if job["status"] != "succeeded":
            raise HTTPException(status_code=409, detail=f"train job {job_id} is {job['status']}; it can be "
                                                        "registered once it has succeeded")
        settings = request.app.state.settings
        ckpt = settings.job_artifacts_dir(str(job_id)) / "ensemble.pt"
        if not ckpt.is_file():
            raise HTTPException(status_code=409, detail=f"train job {job_id} has no ensemble.pt")
        from ensemble_core import registry_io

        try:
            arch, members, combine, spec = registry_io.folder_from_checkpoint(ckpt)
        except Exception as e:  # a torn or foreign file: the job's artifact is unusable, not the server
            raise HTTPException(status_code=409, detail=f"train job {job_id}'s ensemble.pt cannot be read as an "
                                                        f"ensemble checkpoint ({type(e).__name__})") from None
        try:
            _, canon, report = registry_io.validate_members(arch, members, combine, spec["dataset"])
        except registry_io.UploadError as e:  # a data set without test images here: registered unchecked
            report = None
            canon = members
            if not any(f == "dataset" for f, _ in e.problems):
                raise _upload_errors(e) from None
        config = registry_io.make_config(
            arch, spec["dataset"], combine, len(canon), mean=arch["mean"], std=arch["std"], training=spec,
            source={"kind": "train_job", "job_id": str(job_id)},
            paper=body.paper.model_dump(exclude_none=True) if body.paper else None,
            validation=report.to_dict() if report else None)
        try:
            return store.create(owner=job["owner"], name=body.name, version=body.version, tags=body.tags,
                                source="train_job", source_job_id=job_id, config=config, members=canon)
        except ModelConflict as e:
            raise HTTPException(status_code=409, detail=str(e)) from None

    @app.get(MODELS_PATH, response_model=ModelList, tags=["models"], responses=responses_422)
    def list_models(
        request: Request,
        name: Annotated[str | None, Query(max_length=100)] = None,
        tag: Annotated[str | None, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> dict[str, Any]:
        """The caller's models, newest first (an admin's: every model); ``name`` or ``tag`` filter."""
        for field, value in (("name", name), ("tag", tag)):
            if value is not None:
                check_storable(value, ["query", field])
        items, total = store.list(principal_of(request), limit=limit, offset=offset, name=name, tag=tag)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @app.get(MODELS_PATH + "/{model_id}", response_model=Model, tags=["models"], responses=responses_404)
    def get_model(model_id: uuid.UUID, request: Request) -> dict[str, Any]:
        """One model with its ``config.json``."""
        return visible_model(request, model_id)

    @app.delete(MODELS_PATH + "/{model_id}", response_model=Model, tags=["models"], responses=responses_404)
    def delete_model(model_id: uuid.UUID, request: Request) -> dict[str, Any]:
        """Delete a model and its files. Evaluate jobs that name it and have not run yet fail with an error
        naming it; finished evaluations keep their results."""
        try:
            return store.delete(model_id, principal_of(request))
        except ModelNotFound:
            raise _not_found(model_id) from None

    @app.get(MODELS_PATH + "/{model_id}/evaluations", response_model=schemas.JobList, tags=["models"],
             responses=responses_404)
    def model_evaluations(model_id: uuid.UUID, request: Request,
                          limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Evaluate jobs of the model, newest first (``target_model``, or ``target_job`` = its train job)."""
        model = visible_model(request, model_id)
        items = [queue.get(j["id"]) for j in store.evaluations(model, limit=limit)]
        items = [{k: v for k, v in j.items() if k not in ("seq", "request_hash")} for j in items]
        return {"items": items, "total": len(items), "limit": limit, "offset": 0}

    def pick_evaluation(model: dict[str, Any], job_id: uuid.UUID | None) -> tuple[str, dict[str, Any]]:
        evals = store.evaluations(model, status="succeeded", limit=500)
        if job_id is not None:
            evals = [e for e in evals if e["id"] == job_id]
            if not evals:
                raise SpecError([error_item(["query", "job_id"], f"no succeeded evaluation {job_id} of this model")])
        if not evals:
            raise HTTPException(status_code=409, detail=f"model {model['id']} has no succeeded evaluation yet: "
                                                        "submit an evaluate job with target_model")
        result = store.result(evals[0]["id"]) or {}
        return str(evals[0]["id"]), result

    @app.get(MODELS_PATH + "/{model_id}/export/robustbench", tags=["models"],
             responses={**responses_404, **responses_422, 409: {"model": schemas.ErrorResponse}})
    def export_robustbench(
        model_id: uuid.UUID, request: Request,
        job_id: Annotated[uuid.UUID | None, Query(description="the evaluate job (default: the newest succeeded)")]
        = None,
        eps: Annotated[float | None, Query(ge=0, le=64, description="default: the reference AutoAttack's, else the "
                                                                    "largest white-box eps")] = None,
        threat_model: Annotated[Literal["Linf", "L2"], Query()] = "Linf",
    ) -> dict[str, Any]:
        """The model's evaluation as a RobustBench ``model_info`` record: every field of their schema, figures
        as percentage strings, ``number_forward_passes`` = members, ``autoattack_acc`` from the reference
        AutoAttack when it ran, ``external`` = our per-image worst case, ``unreliable`` from our flags."""
        from ensemble_core.interchange import robustbench_record

        model = visible_model(request, model_id)
        ev_id, result = pick_evaluation(model, job_id)
        try:
            return robustbench_record(result, model["config"], eps=eps, threat_model=threat_model, job_id=ev_id)
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise SpecError([error_item(["query", field if field in ("eps", "threat_model") else "eps"],
                                        str(e).split(": ", 1)[-1])]) from None

    @app.get(MODELS_PATH + "/{model_id}/export/huggingface", response_model=ExportListing, tags=["models"],
             responses=responses_404)
    def export_huggingface(model_id: uuid.UUID, request: Request) -> dict[str, Any]:
        """The files of the model's Hugging Face-layout folder (download each with ``.../huggingface/{name}``)."""
        visible_model(request, model_id)
        folder = store.folder(model_id)
        files = [{"name": n, "size": (folder / n).stat().st_size if (folder / n).is_file() else None}
                 for n in EXPORT_FILES]
        return {"model_id": model_id, "files": files}

    @app.get(MODELS_PATH + "/{model_id}/export/huggingface/{name}", tags=["models"], responses=responses_404,
             response_class=FileResponse)
    def export_huggingface_file(model_id: uuid.UUID, name: str, request: Request) -> Any:
        """``config.json``, ``model.safetensors`` or ``README.md`` (the model card: Hugging Face metadata, the
        evaluation tables of every succeeded evaluation, the exact training spec), generated now."""
        model = visible_model(request, model_id)
        if name not in EXPORT_FILES:
            raise HTTPException(status_code=404, detail=f"no export file {name[:80]!r}; expected one of "
                                                        f"{', '.join(EXPORT_FILES)}")
        if name == "README.md":
            from ensemble_core.interchange import model_card

            evals = [(str(e["id"]), store.result(e["id"]) or {})
                     for e in store.evaluations(model, status="succeeded", limit=20)]
            return PlainTextResponse(model_card(model["config"], evals), media_type="text/markdown; charset=utf-8")
        path = store.folder(model_id) / name
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"model {model_id} has no file {name}")
        return FileResponse(path, filename=name, media_type="application/octet-stream")


__all__ = ["EXPORT_FILES", "MODELS_PATH", "REGISTER_PATH", "Model", "ModelList", "PaperInfo", "RegisterModel",
           "register_model_routes"]
