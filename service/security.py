"""Browser-facing protections of the API: security headers, the ``Host`` check and the API docs page.

- :class:`SecurityHeaders` (ASGI middleware, outermost) adds to **every** response, errors and 413s
  included: a ``Content-Security-Policy`` (scripts from this origin only, ``frame-ancestors 'none'``,
  no plugins, no ``<base>``), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
  ``Referrer-Policy: no-referrer``. The dashboard keeps its API token in ``localStorage`` on this
  origin, so no script from elsewhere may run here.
- :class:`HostCheck` refuses (400) a request whose ``Host`` header is not one of the configured names.
  It runs when authentication is off (the local ``up`` mode, where every request acts as an admin):
  a DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) would otherwise drive the local API
  from the user's browser. ``RE_ALLOWED_HOSTS`` adds names (``Settings.allowed_hosts``).
- :func:`swagger_ui_html` is the ``/docs`` page: the Swagger UI bundle and style sheet at a pinned
  version with Subresource Integrity hashes (the browser refuses them if the CDN serves other bytes),
  and its initialiser allowed by its SHA-256 in the page's own CSP (no ``'unsafe-inline'`` scripts).
  ReDoc (an unpinned script) is not served.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Swagger UI from the npm package swagger-ui-dist, pinned; the hashes are of the files of its npm tarball
# (which npm checked against the registry's own sha512), as jsDelivr serves them unchanged.
SWAGGER_UI_VERSION = "5.35.0"
SWAGGER_UI_BASE = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
SWAGGER_UI_JS = (f"{SWAGGER_UI_BASE}/swagger-ui-bundle.js",
                 "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9")
SWAGGER_UI_CSS = (f"{SWAGGER_UI_BASE}/swagger-ui.css",
                  "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I")
CDN_ORIGIN = "https://cdn.jsdelivr.net"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect")

COMMON_CSP = "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
# The dashboard: its own script and style sheet; style attributes (bar widths, legend colours) need
# 'unsafe-inline' for styles only; the favicon is a data: URL, the plots blob: URLs of fetched artifacts
# (fetched with the token, so they cannot be plain <img src> links).
DEFAULT_CSP = (f"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               f"img-src 'self' data: blob:; connect-src 'self'; {COMMON_CSP}")

HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)

def _swagger_init(openapi_url: str, title: str) -> str:
    config = {"url": openapi_url, "dom_id": "#swagger-ui", "layout": "BaseLayout", "deepLinking": True,
              "showExtensions": True, "showCommonExtensions": True}
    # json.dumps escapes nothing HTML-special here (fixed URL and title), but keep "</" out of the script
    body = json.dumps(config).replace("</", "<\\/")
    return (f"window.ui = SwaggerUIBundle(Object.assign({body}, {{presets: [SwaggerUIBundle.presets.apis, "
            f"SwaggerUIBundle.SwaggerUIStandalonePreset]}})); document.title = {json.dumps(title)};")


def _sha256_source(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def docs_csp(init_script: str) -> str:
    """The ``/docs`` page's policy: the pinned CDN for the bundle and CSS, the initialiser by its hash."""
    return (f"default-src 'self'; script-src 'self' {CDN_ORIGIN} {_sha256_source(init_script)}; "
            f"style-src 'self' {CDN_ORIGIN} 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            f"{COMMON_CSP}")


def swagger_ui_html(openapi_url: str, title: str) -> tuple[str, str]:
    """``(html, csp)`` of the API docs page."""
    init = _swagger_init(openapi_url, title)
    js_url, js_sri = SWAGGER_UI_JS
    css_url, css_sri = SWAGGER_UI_CSS
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{css_url}" integrity="{css_sri}" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js_url}" integrity="{js_sri}" crossorigin="anonymous"></script>
<script>{init}</script>
</body>
</html>
"""
    return html, docs_csp(init)


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response (a header the app set is kept)."""

    def __init__(self, app: ASGIApp, docs_policy: str | None = None) -> None:
        self.app = app
        self.docs_policy = docs_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = self.docs_policy if self.docs_policy and path in DOCS_PATHS else DEFAULT_CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {k.lower() for k, _ in headers}
                extra = [(b"content-security-policy", csp.encode()), *HEADERS]
                headers += [(k, v) for k, v in extra if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def host_name(header: str) -> str:
    """The name of a ``Host`` header, lower-cased, without the port (``[::1]:8000`` -> ``::1``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    return h


def allowed_host_names(names: Iterable[str]) -> frozenset[str]:
    """Normalised names (``[::1]`` -> ``::1``, ports dropped, trailing dots dropped)."""
    return frozenset(host_name(n).rstrip(".") for n in names if n and n.strip())


class HostCheck:
    """ASGI middleware: 400 for a request whose ``Host`` is not in ``allowed`` (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = allowed_host_names(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"")
        try:
            name = host_name(raw.decode("ascii")).rstrip(".")
        except UnicodeDecodeError:
            name = ""
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "invalid Host header: this API answers only to "
                                     f"{', '.join(sorted(self.allowed))} while authentication is off "
                                     "(add names with RE_ALLOWED_HOSTS)"}).encode()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


__all__ = ["DEFAULT_CSP", "SWAGGER_UI_VERSION", "HostCheck", "SecurityHeaders", "allowed_host_names",
           "docs_csp", "host_name", "swagger_ui_html"]
