"""The dashboard's compare page fetches well-formed job ids only, under the security headers (issue #27).

Found by the black-box probe: ``#/compare?ids=...`` put whatever the link said into request paths,
with the saved token (``/v1/jobs/../../healthz``, ``/v1/jobs/<id>/cancel`` ...). Setting: uvicorn
serves ``create_app`` on 127.0.0.1 (auth on, a real PostgreSQL), two queued jobs, headless Chromium
(Playwright) with the token in ``localStorage``, every request the page makes recorded. The page also
runs under the Content-Security-Policy that every response now carries: no violation may be reported.

Without a browser the test fails (it does not skip) unless ``RE_SKIP_BROWSER=1`` is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.client import Client
from service.db import make_engine
from service.settings import Settings

pytestmark = pytest.mark.integration

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
TRAIN = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 300}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _chromium() -> str | None:
    skip = os.environ.get("RE_SKIP_BROWSER") == "1"
    explicit = os.environ.get("RE_CHROMIUM")
    for candidate in ((explicit,) if explicit else CHROMIUM_CANDIDATES):
        if candidate and (Path(candidate).is_file() or shutil.which(candidate)):
            return candidate
    if skip:
        return None
    pytest.fail("no Chromium found (apt-get install chromium); set RE_CHROMIUM, or RE_SKIP_BROWSER=1 to skip")


@pytest.fixture()
def served(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    import uvicorn

    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    token, _ = TokenStore(engine).create("alice")
    app = create_app(Settings(data_dir=tmp_path, database_url=pg_url, auth=True), engine=engine, warm=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    client = Client(url, token=token)
    ids = [client.submit("train", TRAIN)["id"], client.submit("train", {**TRAIN, "members": 3})["id"]]
    try:
        yield url, token, ids
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_compare_page_fetches_only_well_formed_job_ids(served: tuple[str, str, list[str]]) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("RE_SKIP_BROWSER=1")
    from playwright.sync_api import sync_playwright

    url, token, (a, b) = served
    crafted = ["../../healthz?x=1", f"{a}/cancel", f"..%2F..%2Fv1%2Fjobs%2F{a}%2Fcancel", "x" * 300, f"{b}?y"]
    link = f"{url}/ui/#/compare?ids=" + ",".join([a, *[quote(c, safe='') for c in crafted], b])
    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context()
        context.add_init_script(f"window.localStorage.setItem('re_api_token', {json.dumps(token)});")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(link)
        page.wait_for_selector("body[data-ready]")
        page.wait_for_selector("#compare-table")
        refused = page.inner_text("#compare-refused")
        browser.close()
    api_paths = [urlsplit(r.split(" ", 1)[1]) for r in requests if "/v1/" in r or "/healthz" in r]
    assert api_paths, requests
    for p in api_paths:
        assert re.fullmatch(rf"/v1/jobs/{UUID}(/metrics|/results)?", p.path) and not p.query, (p, requests)
    assert not [r for r in requests if r.startswith("POST")], requests
    fetched = {re.match(rf"/v1/jobs/({UUID})", p.path).group(1) for p in api_paths}  # type: ignore[union-attr]
    assert fetched == {a, b}
    assert "Not job ids, left out" in refused and "healthz" in refused
    assert not problems, problems  # no CSP violation, no script error
