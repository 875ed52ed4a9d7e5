"""Bearer API tokens, the principal of a request, and tenancy (who may see which job).

Tokens are created with ``robust-ensembles token create --owner NAME [--admin]``. A token is 32
random bytes (``secrets.token_urlsafe``) behind the prefix ``re_``; the database keeps only its
SHA-256 hash (a high-entropy secret needs no slow password hash), its first characters (to
recognise it in ``token list``), its owner and its scope:

- ``user``: sees and acts on the jobs of its owner only; any other job answers 404 (as a missing one);
- ``admin``: sees every job and may name server paths in specs (``data_dir``, ``*_checkpoint``).

When ``Settings.auth`` is on, every route under ``/v1`` needs ``Authorization: Bearer <token>``
(401 otherwise); the routes outside ``/v1`` (``/healthz``, ``/readyz``, the OpenAPI docs and the
dashboard's static shell) carry no data and stay open. With auth off (the local ``up`` / ``demo``
mode) every request acts as :data:`LOCAL`, an admin without an owner, and jobs get no owner.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, text

TOKEN_PREFIX = "re_"
SCOPES = ("user", "admin")
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
PROTECTED_PREFIX = "/v1"
LAST_USED_RESOLUTION_S = 60  # last_used_at is written at most once a minute per token
SERVER_PATH_FIELDS = {  # spec fields that name files on the service's machines
    "train": ("data_dir",),
    "evaluate": ("target_checkpoint", "transfer_from_checkpoint", "baseline_checkpoint"),
}
TOKEN_HELP = "create one with `robust-ensembles token create --owner NAME` and send 'Authorization: Bearer <token>'"

bearer_scheme = HTTPBearer(auto_error=False, description="an API token from `robust-ensembles token create`")


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. ``owner`` None = authentication is off (local mode)."""

    owner: str | None
    scope: str
    token_id: uuid.UUID | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def can_see(self, job_owner: str | None) -> bool:
        """Admins see every job; a user only the jobs its owner submitted."""
        return self.is_admin or (self.owner is not None and job_owner == self.owner)

    @property
    def list_filter(self) -> str | None:
        """The owner to filter listings by (None: no filter)."""
        return None if self.is_admin else self.owner


LOCAL = Principal(owner=None, scope="admin")  # authentication off: the local single-user mode
ANONYMOUS = Principal(owner=None, scope="anonymous")  # auth on, an open route: sees no job


def generate_token() -> str:
    """A new secret token: ``re_`` + 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def validate_owner(owner: str) -> str:
    """An owner name: 1-64 characters, letters, digits and ``_ . @ -`` (starting with a letter or digit)."""
    if not OWNER_PATTERN.match(owner or ""):
        raise ValueError(f"invalid owner {owner!r}: use 1-64 letters, digits, '_', '.', '@' or '-' "
                         f"(starting with a letter or digit)")
    return owner


class TokenStore:
    """The ``api_tokens`` table (migration 0002)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, owner: str, *, admin: bool = False, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """A new token for ``owner``; returns ``(secret, record)``. The secret is not stored: show it once."""
        validate_owner(owner)
        token = generate_token()
        row = {"id": uuid.uuid4(), "token_hash": hash_token(token), "prefix": token[:10], "owner": owner,
               "scope": "admin" if admin else "user", "name": name}
        with self.engine.begin() as c:
            rec = c.execute(text(
                "INSERT INTO api_tokens (id, token_hash, prefix, owner, scope, name) "
                "VALUES (:id, :token_hash, :prefix, :owner, :scope, :name) "
                "RETURNING id, prefix, owner, scope, name, created_at, last_used_at, revoked_at"), row).one()
        return token, dict(rec._mapping)

    def list(self, *, include_revoked: bool = False) -> list[dict[str, Any]]:
        cond = "" if include_revoked else "WHERE revoked_at IS NULL"
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT id, prefix, owner, scope, name, created_at, last_used_at, revoked_at "
                                  f"FROM api_tokens {cond} ORDER BY created_at, id"))
            return [dict(r._mapping) for r in rows]

    def revoke(self, ident: str) -> list[dict[str, Any]]:
        """Revoke the token with this id, or the active tokens whose prefix (``re_...``) starts with ``ident``.

        A prefix must be at least 6 characters and match exactly one active token; returns the revoked rows.
        """
        try:
            token_id: uuid.UUID | None = uuid.UUID(ident)
        except ValueError:
            token_id = None
        with self.engine.begin() as c:
            if token_id is not None:
                rows = c.execute(text("UPDATE api_tokens SET revoked_at = now() WHERE id = :id AND revoked_at "
                                      "IS NULL RETURNING id, prefix, owner, scope"), {"id": token_id}).all()
            else:
                if len(ident) < 6:
                    raise ValueError("give the token's id or at least 6 characters of its prefix")
                ids = c.execute(text("SELECT id FROM api_tokens WHERE revoked_at IS NULL AND "
                                     "starts_with(prefix, :p)"), {"p": ident[:10]}).scalars().all()
                if len(ids) > 1:
                    raise ValueError(f"prefix {ident!r} matches {len(ids)} tokens; give the token's id")
                rows = c.execute(text("UPDATE api_tokens SET revoked_at = now() WHERE id = ANY(:ids) "
                                      "RETURNING id, prefix, owner, scope"), {"ids": list(ids)}).all()
        return [dict(r._mapping) for r in rows]

    def authenticate(self, token: str) -> Principal | None:
        """The principal of an active token, or None (unknown, malformed or revoked)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256 or not token.isascii():
            return None
        digest = hash_token(token)
        with self.engine.connect() as c:
            row = c.execute(text("SELECT id, token_hash, owner, scope, last_used_at < now() - make_interval("
                                 "secs => :res) OR last_used_at IS NULL AS stale FROM api_tokens "
                                 "WHERE token_hash = :h AND revoked_at IS NULL"),
                            {"h": digest, "res": LAST_USED_RESOLUTION_S}).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.stale:
            with self.engine.begin() as c:
                c.execute(text("UPDATE api_tokens SET last_used_at = now() WHERE id = :id"), {"id": row.id})
        return Principal(owner=row.owner, scope=row.scope, token_id=row.id)

    def is_active(self, token_id: uuid.UUID) -> bool:
        """Whether the token with this id exists and is not revoked (open streams re-check it)."""
        with self.engine.connect() as c:
            row = c.execute(text("SELECT 1 FROM api_tokens WHERE id = :id AND revoked_at IS NULL"),
                            {"id": token_id}).first()
        return row is not None

    def count_active(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text("SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL")).scalar_one())


def job_owner(engine: Engine, job_id: uuid.UUID) -> tuple[bool, str | None]:
    """``(exists, owner)`` of a job."""
    with engine.connect() as c:
        row = c.execute(text("SELECT owner FROM jobs WHERE id = :id"), {"id": job_id}).first()
    return (False, None) if row is None else (True, row.owner)


def not_found(job_id: object) -> HTTPException:
    """The answer for a missing job and for another owner's job alike (no existence leak)."""
    return HTTPException(status_code=404, detail=f"no job with id {job_id}")


def principal_of(request: Request) -> Principal:
    """The principal the auth dependency attached to the request (:data:`LOCAL` with auth off)."""
    return getattr(request.state, "principal", ANONYMOUS)


def unauthorized(detail: str) -> HTTPException:
    """A 401 answer that tells the client to send a bearer token."""
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def make_auth_dependency(enabled: bool, engine: Engine) -> Any:
    """The app-wide dependency: authenticate ``/v1`` requests and hide other owners' jobs.

    Every route with a ``job_id`` path parameter (the job and everything under it: events, metrics,
    logs, results, artifacts, cancel, trials, train-best, and routes added later) answers 404 for a
    job the principal may not see.
    """
    store = TokenStore(engine)

    def dependency(request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> None:
        if not enabled:
            request.state.principal = LOCAL
        elif not request.url.path.startswith(PROTECTED_PREFIX):
            request.state.principal = ANONYMOUS  # open routes (health, docs, dashboard shell) carry no data
            return
        elif credentials is None:
            if request.headers.get("authorization"):
                raise unauthorized("malformed Authorization header: expected 'Bearer <token>'")
            raise unauthorized(f"authentication required: {TOKEN_HELP}")
        else:
            found = store.authenticate(credentials.credentials)
            if found is None:
                raise unauthorized("invalid or revoked API token")
            request.state.principal = found
        principal: Principal = request.state.principal
        raw = request.path_params.get("job_id")
        if raw is None or principal.is_admin:
            return
        try:
            job_id = uuid.UUID(str(raw))
        except ValueError:
            return  # the route's own validation answers 422
        exists, owner = job_owner(engine, job_id)
        if not exists or not principal.can_see(owner):
            raise not_found(job_id)

    return dependency


def server_path_errors(principal: Principal, kind: str, spec: dict[str, Any], prefix: list[str | int]) -> list[
        dict[str, Any]]:
    """422 items for spec fields naming server paths, which only an admin (or local mode) may set."""
    from service.submission import error_item

    if principal.is_admin:
        return []
    errors = []
    for field in SERVER_PATH_FIELDS.get(kind, ()):
        if spec.get(field) is not None:
            errors.append(error_item([*prefix, field], "server paths may only be set with an admin token"
                                     + ("; name a train job with target_job / transfer_from_job / baseline_job"
                                        if kind == "evaluate" else ""), "permission_error"))
    if kind == "tune" and isinstance(spec.get("base"), dict):
        errors += server_path_errors(principal, "train", spec["base"], [*prefix, "base"])
    return errors


__all__ = ["ANONYMOUS", "LOCAL", "Principal", "SCOPES", "TOKEN_PREFIX", "TokenStore", "bearer_scheme", "generate_token",
           "hash_token", "job_owner", "make_auth_dependency", "not_found", "principal_of", "server_path_errors",
           "unauthorized", "validate_owner"]
