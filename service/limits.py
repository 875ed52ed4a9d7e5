"""Request limits of the API: body size (413) and values PostgreSQL cannot store (422).

The numeric bounds of the specs themselves (members, epochs, batch size, eps, steps, restarts,
examples, trials...) live in :mod:`ensemble_core.spec`, so the library enforces them too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from service.queue import RESERVED_KEY_PREFIX  # the worker's own keys of trial rows (Queue.upsert_trials)
from service.submission import MAX_ERRORS, SpecError, cap_errors, error_item

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before the app parses it.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is read up to the
    limit and refused as soon as it passes it (then replayed to the app when it fits). ``routes`` gives
    single routes their own limit, by ``(method, path)`` (the model upload, ``POST /v1/models``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES,
                 routes: Mapping[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope["method"], str(scope.get("path", "")).rstrip("/") or "/"), self.max_bytes)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._reject(send, 400, "invalid Content-Length header")
                return
            if length > limit:
                await self._too_large(send, limit)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await self._too_large(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, limit: int) -> None:
        await self._reject(send, 413, f"request body larger than {limit} bytes")

    @staticmethod
    async def _reject(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


MAX_DEPTH = 32  # nesting of JSON objects/arrays in a spec
MAX_VALUES = 20_000  # values in a spec (the largest valid search space has ~8,500)


def nul_errors(value: Any, loc: list[str | int]) -> list[dict[str, Any]]:
    """422 items for strings (keys or values) holding a NUL character, which PostgreSQL cannot store,
    for values nested deeper than :data:`MAX_DEPTH`, and for more than :data:`MAX_VALUES` values in all
    (so an invalid body of 1 MiB is refused in milliseconds, not validated into 100,000 errors)."""
    out: list[dict[str, Any]] = []
    stack: list[tuple[Any, list[str | int]]] = [(value, list(loc))]
    seen = 0
    while stack and len(out) < 20:
        v, where = stack.pop()
        seen += 1
        if seen > MAX_VALUES:  # refused before any validation builds an error per value
            out.append(error_item(list(loc), f"more than {MAX_VALUES} values (keys, items and leaves): too large",
                                  "too_large"))
            break
        if isinstance(v, str):
            if "\x00" in v:
                out.append(error_item(where, "NUL characters are not allowed", "string_nul"))
            continue
        if not isinstance(v, dict | list | tuple):
            continue
        if len(where) - len(loc) >= MAX_DEPTH:
            out.append(error_item(where, f"nested deeper than {MAX_DEPTH} levels", "too_deep"))
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if isinstance(k, str) and "\x00" in k:
                    out.append(error_item([*where, k.replace("\x00", "\\0")],
                                          "NUL characters are not allowed in keys", "string_nul"))
                else:
                    stack.append((x, [*where, k]))
        else:
            stack.extend((x, [*where, i]) for i, x in enumerate(v))
    return out


MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_KEY_LOC: list[str | int] = ["header", "Idempotency-Key"]


def check_idempotency_key(key: str | None) -> None:
    """Raise :class:`SpecError` (422 naming ``header.Idempotency-Key``) for a key no submission may use:
    empty or over 255 characters, holding NUL, or starting with the worker's reserved ``trial:`` (any case)."""
    if key is None:
        return
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise SpecError([error_item(IDEMPOTENCY_KEY_LOC, f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")])
    check_storable(key, IDEMPOTENCY_KEY_LOC)
    if key[: len(RESERVED_KEY_PREFIX)].lower() == RESERVED_KEY_PREFIX:
        raise SpecError([error_item(IDEMPOTENCY_KEY_LOC, f"keys starting with {RESERVED_KEY_PREFIX!r} are reserved "
                                                         "for the trials of tune jobs; choose another key")])


def check_storable(value: Any, loc: list[str | int]) -> None:
    """Raise :class:`SpecError` (422) when ``value`` holds strings PostgreSQL cannot store."""
    errors = nul_errors(value, loc)
    if errors:
        raise SpecError(errors)


__all__ = ["MAX_BODY_BYTES", "MAX_ERRORS", "MAX_IDEMPOTENCY_KEY", "MAX_VALUES", "RESERVED_KEY_PREFIX", "BodySizeLimit",
           "cap_errors", "check_idempotency_key", "check_storable", "nul_errors"]
