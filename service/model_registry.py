"""The model registry's storage: rows in ``models`` (migration 0006) and one folder per model.

A model's files are ``<models dir>/<id>/config.json`` and ``model.safetensors`` (the Hugging Face layout of
:mod:`ensemble_core.registry_io`), on storage the workers share. A model is created whole or not at all: its
folder is written under a hidden temporary name, the row inserted, the folder renamed into place, and the
transaction committed; any failure removes the folder and leaves no row. Deletion removes the row first, so a
crash can leave only an unreferenced folder, never a row without files.

Tenancy: a model belongs to the owner of the token that registered it; any other owner gets the answer of a
model that does not exist (:class:`ModelNotFound` -> 404), admins see every model. No torch is imported here.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from service.auth import Principal

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # no '/', no leading '.', so never a path
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,39}$")
MAX_TAGS = 16
MODEL_COLUMNS = ("id, owner, name, version, tags, source, source_job_id, architecture, dataset, combine, members, "
                 "config, size_bytes, sha256, created_at")


class ModelNotFound(Exception):
    """No model with this id, or one the caller may not see (the same answer: 404)."""


class ModelConflict(Exception):
    """The owner already has a model with this name and version (409)."""


def name_problem(value: str) -> str | None:
    """Why ``value`` is not a model name (None when it is one)."""
    if not NAME_RE.match(value or ""):
        return ("a name is 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', no "
                "path)")
    if ".." in value:
        return "a name may not contain '..'"
    return None


def version_problem(value: str) -> str | None:
    """Why ``value`` is not a model version (None when it is one)."""
    if not VERSION_RE.match(value or "") or ".." in value:
        return "a version is 1-32 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def tags_problem(tags: list[str]) -> str | None:
    """Why ``tags`` are not valid tags (None when they are)."""
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} tags"
    bad = [t for t in tags if not TAG_RE.match(t)]
    if bad:
        return (f"tag {bad[0][:50]!r}: a tag is 1-40 letters, digits, '.', '_', ':' or '-', starting with a letter "
                "or digit")
    return None


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A model row as the API returns it."""
    return dict(row)


class ModelStore:
    """The ``models`` table and the model folders under ``root``."""

    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = Path(root)

    def folder(self, model_id: uuid.UUID | str) -> Path:
        """The folder of a model (whether or not it exists)."""
        return self.root / str(uuid.UUID(str(model_id)))

    # ------------------------------------------------------------------ reads
    def _row(self, model_id: uuid.UUID) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(text(f"SELECT {MODEL_COLUMNS} FROM models WHERE id = :id"), {"id": model_id}).first()
        return None if row is None else dict(row._mapping)

    def get(self, model_id: uuid.UUID, principal: Principal) -> dict[str, Any]:
        """The model, or :class:`ModelNotFound` when it does not exist or ``principal`` may not see it."""
        row = self._row(model_id)
        if row is None or not principal.can_see(row["owner"]):
            raise ModelNotFound(str(model_id))
        return row

    def list(self, principal: Principal, *, limit: int = 50, offset: int = 0, name: str | None = None,
             tag: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Newest first: the caller's models (every model for an admin), optionally one name or one tag."""
        where, params = [], {"limit": limit, "offset": offset}  # type: ignore[var-annotated]
        owner = principal.list_filter
        if not principal.is_admin:
            if owner is None:  # an anonymous principal sees nothing
                return [], 0
            where.append("owner = :owner")
            params["owner"] = owner
        if name is not None:
            where.append("name = :name")
            params["name"] = name
        if tag is not None:
            where.append(":tag = ANY(tags)")
            params["tag"] = tag
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        with self.engine.connect() as c:
            total = int(c.execute(text(f"SELECT count(*) FROM models {cond}"), params).scalar_one())
            rows = c.execute(text(f"SELECT {MODEL_COLUMNS} FROM models {cond} ORDER BY created_at DESC, id "
                                  "LIMIT :limit OFFSET :offset"), params).all()
        return [dict(r._mapping) for r in rows], total

    def visible(self, model_id: uuid.UUID, principal: Principal) -> bool:
        """Whether the model exists and ``principal`` may see it."""
        row = self._row(model_id)
        return row is not None and principal.can_see(row["owner"])

    def evaluations(self, model: dict[str, Any], *, status: str | None = None, limit: int = 50
                    ) -> list[dict[str, Any]]:
        """Evaluate jobs of the model, newest first: those naming it as ``target_model``, and, for a model
        registered from a train job, those naming that job as ``target_job`` (the same weights). Only jobs of
        the model's owner."""
        params: dict[str, Any] = {"mid": str(model["id"]), "limit": limit, "owner": model["owner"],
                                  "job": str(model["source_job_id"]) if model.get("source_job_id") else None}
        cond = "" if status is None else "AND status = :status"
        if status is not None:
            params["status"] = status
        with self.engine.connect() as c:
            rows = c.execute(text(
                "SELECT id, kind, status, spec, error, created_at, finished_at, owner FROM jobs "
                "WHERE kind = 'evaluate' "
                "AND COALESCE(owner, '') = COALESCE(CAST(:owner AS text), '') AND (spec->>'target_model' = :mid "
                f"OR (CAST(:job AS text) IS NOT NULL AND spec->>'target_job' = :job)) {cond} "
                "ORDER BY seq DESC LIMIT :limit"), params).all()
        return [dict(r._mapping) for r in rows]

    def result(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        """An evaluate job's results."""
        with self.engine.connect() as c:
            row = c.execute(text("SELECT result FROM jobs WHERE id = :id"), {"id": job_id}).first()
        return None if row is None else row.result

    # ------------------------------------------------------------------ writes
    def create(self, *, owner: str | None, name: str, version: str, tags: list[str], source: str,
               source_job_id: uuid.UUID | None, config: dict[str, Any], members: list[Any]) -> dict[str, Any]:
        """Write the folder and insert the row, all or nothing; :class:`ModelConflict` when the owner already
        has ``name`` at ``version``."""
        from ensemble_core.registry_io import WEIGHTS_FILE, atomic_folder, remove_tree, write_folder
        from service.queue import to_json

        model_id = uuid.uuid4()
        config = {**config, "id": str(model_id), "name": name, "version": version, "tags": tags}
        tmp = atomic_folder(self.root)
        final = self.folder(model_id)
        try:
            sha = write_folder(tmp, config, members)
            size = (tmp / WEIGHTS_FILE).stat().st_size
            with self.engine.begin() as c:
                row = c.execute(text(
                    f"INSERT INTO models ({MODEL_COLUMNS.replace(', created_at', '')}) VALUES (:id, :owner, :name, "
                    ":version, :tags, :source, :job, :arch, :dataset, :combine, :members, CAST(:config AS jsonb), "
                    f":size, :sha) RETURNING {MODEL_COLUMNS}"),
                    {"id": model_id, "owner": owner, "name": name, "version": version, "tags": tags,
                     "source": source, "job": source_job_id, "arch": config["architecture"],
                     "dataset": config["dataset"], "combine": config["combine"], "members": config["members"],
                     "config": to_json(config), "size": size, "sha": sha}).one()
                os.replace(tmp, final)
        except IntegrityError as e:
            remove_tree(tmp)
            remove_tree(final)
            if "uq_models_owner_name_version" in str(e):
                raise ModelConflict(f"a model named {name!r} with version {version!r} exists already; choose "
                                    "another version") from None
            raise
        except BaseException:
            remove_tree(tmp)
            remove_tree(final)
            raise
        return dict(row._mapping)

    def delete(self, model_id: uuid.UUID, principal: Principal) -> dict[str, Any]:
        """Delete a model (row, then files); :class:`ModelNotFound` as :meth:`get`."""
        from ensemble_core.registry_io import remove_tree

        row = self.get(model_id, principal)
        with self.engine.begin() as c:
            c.execute(text("DELETE FROM models WHERE id = :id"), {"id": model_id})
        remove_tree(self.folder(model_id))
        return row


__all__ = ["MAX_TAGS", "ModelConflict", "ModelNotFound", "ModelStore", "name_problem", "public", "tags_problem",
           "version_problem"]
