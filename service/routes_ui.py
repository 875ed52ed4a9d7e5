"""The web dashboard: static HTML/JS/CSS served by the API itself (no build step, no CDN).

- ``GET /`` redirects to ``/ui/``;
- ``GET /ui/`` is the single page (``service/static/index.html``); its script renders the job list
  (``#/``), a job page (``#/jobs/<id>``) and a comparison of two or more jobs (``#/compare?ids=a,b``)
  from the REST API (``/v1/...``) in the browser;
- ``GET /ui/static/<file>`` serves the script and the style sheet.

The shell holds no data, so it is served without authentication; the page's requests to ``/v1``
carry ``Authorization: Bearer <token>`` when a token was entered in the page (kept in the browser's
``localStorage``). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
UI_PREFIX = "/ui"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The files change with the package, not per request: revalidate every time (cheap; a few kB).
NO_CACHE = {"Cache-Control": "no-cache"}
MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems

router = APIRouter(include_in_schema=False)


def static_file(name: str) -> Path | None:
    """A file directly inside ``service/static`` with a served extension, or None.

    Names longer than a file name can be (255 bytes) are None without asking the file system, and any
    ``OSError`` of the lookup is None too: ``Path.is_file()`` of Python 3.11 raises on ``ENAMETOOLONG``,
    which was a 500 with a traceback in the log for every such request."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        return None
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return None
    path = STATIC_DIR / name
    try:
        if path.suffix not in MEDIA_TYPES or not path.is_file():
            return None
    except (OSError, ValueError):
        return None
    return path


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard is the landing page of the service."""
    return RedirectResponse(f"{UI_PREFIX}/", status_code=307)


@router.get(UI_PREFIX)
def ui_redirect() -> RedirectResponse:
    """``/ui`` -> ``/ui/`` (relative links in the page need the trailing slash)."""
    return RedirectResponse(f"{UI_PREFIX}/", status_code=307)


@router.get(f"{UI_PREFIX}/")
def ui_index() -> FileResponse:
    """The dashboard's single page."""
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)


@router.get(f"{UI_PREFIX}/static/{{name}}")
def ui_static(name: str) -> FileResponse:
    """The dashboard's script, style sheet and icon."""
    path = static_file(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no dashboard file {_quote(name)}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)


def _quote(name: str, limit: int = 80) -> str:
    """``name`` for an error message, shortened: an answer need not echo a name of thousands of characters."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


__all__ = ["STATIC_DIR", "UI_PREFIX", "router", "static_file"]
