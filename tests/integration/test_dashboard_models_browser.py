"""The dashboard's model pages in headless Chromium, under the service's strict CSP, with a real upload and a
real evaluation of it.

uvicorn serves ``create_app`` (tokens on) over an embedded PostgreSQL; two plain torch members are uploaded
through the HTTP client, an evaluate job of the model (FGSM on 40 MNIST test images) is run by a real
:class:`~workers.worker.Worker` in this process with the service's own evaluate runner. The browser must show
the model on the list, its facts and its evaluation's numbers on its page, the RobustBench record and the
model card download, with no console error (a CSP violation is one) and no failed request.
Without a browser the test fails unless ``RE_SKIP_BROWSER=1`` (then it skips), as test_dashboard_browser.py;
``RE_DASHBOARD_SCREENSHOTS=<dir>`` saves a screenshot of each page.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plain_torch import MEAN, STD, plain
from safetensors.torch import save_file
from test_dashboard_browser import chromium  # noqa: F401 (the fixture)

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.client import Client
from service.db import make_engine
from service.settings import Settings
from workers.worker import Worker, run_evaluate

pytestmark = pytest.mark.integration


@pytest.fixture()
def served(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Client, dict[str, Any], str]]:
    import socket

    import uvicorn

    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, poll_seconds=0.5,
                        retry_backoff_seconds=0.0, default_max_attempts=1)
    engine = make_engine(pg_url)
    token, _ = TokenStore(engine).create("alice")
    app = create_app(settings, engine=engine, warm=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    client = Client(url, token=token)
    try:
        files = []
        for seed in (0, 1):
            path = tmp_path / f"m{seed}.safetensors"
            save_file(plain(seed).state_dict(), str(path))
            files.append(path)
        model = client.upload_model(files, name="plain-lenet", architecture="lenet5", dataset="mnist",
                                    mean=[MEAN], std=[STD], tags=["browser"], training="plain torch, untrained")
        ev = client.submit("evaluate", {"target_model": model["id"], "n_examples": 40, "batch_size": 40,
                                        "attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}], "member_transfer": None,
                                        "checks": {"large_eps": None, "convergence": False}})["id"]
        Worker(settings, runners={"evaluate": run_evaluate}).run(max_jobs=1)
        assert client.job(ev)["status"] == "succeeded", client.job(ev)["error"]
        yield url, token, client, model, ev
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)
        engine.dispose()


def test_the_model_pages_show_the_upload_and_its_evaluation(chromium: str | None,  # noqa: F811
                                                             served: tuple[str, str, Client, dict[str, Any], str],
                                                             tmp_path: Path) -> None:
    url, token, client, model, ev = served
    if chromium is None:
        pytest.skip("RE_SKIP_BROWSER=1: the browser part is skipped")
    from playwright.sync_api import sync_playwright

    result = client.results(ev)
    record = client.export_robustbench(model["id"])
    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(accept_downloads=True)
        context.add_init_script(f"window.localStorage.setItem('re_api_token', {json.dumps(token)});")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

        shots = os.environ.get("RE_DASHBOARD_SCREENSHOTS")

        def ready(name: str) -> None:
            page.wait_for_selector("body[data-ready]", state="attached")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)
            assert page.locator("#banner").is_hidden(), page.locator("#banner").inner_text()
            text = page.evaluate("() => { const c = document.getElementById('app').cloneNode(true);"
                                 " c.querySelectorAll('pre').forEach((e) => e.remove()); return c.textContent; }")
            assert not re.search(r"\b(null|undefined|NaN)\b|\[object ", text), text

        page.goto(f"{url}/ui/")
        ready("jobs")
        page.locator('nav a[href="#/models"]').click()
        page.wait_for_selector("#models-table")
        ready("models")
        link = page.locator(f'#models-table a[data-model="{model["id"]}"]')
        assert link.inner_text() == "plain-lenet"
        row = page.locator("#models-table tbody tr").first.inner_text()
        assert "2 × lenet5" in row and "mnist" in row and "browser" in row and "upload" in row
        link.click()
        page.wait_for_selector("#model-evals")
        ready("model")
        facts = page.locator("#model-facts-table").inner_text()
        assert model["id"] in facts and "mean_logits" in facts and "foolbox" in facts
        ev_row = page.locator("#model-evals tbody tr").first.inner_text()
        clean = result["clean"]["target"]["clean_acc"]
        assert ev[:8] in ev_row and "succeeded" in ev_row and f"{100 * clean:.1f}%" in ev_row
        assert "worst case (Linf, all attacks) ε=0.2" in ev_row
        page.locator("#export-robustbench").click()
        page.wait_for_function("() => document.getElementById('robustbench-record').textContent.length > 10")
        assert json.loads(page.locator("#robustbench-record").inner_text()) == record
        with page.expect_download() as dl:
            page.locator('button[data-export="README.md"]').click()
        saved = tmp_path / "README.md"
        dl.value.save_as(saved)
        card = saved.read_text()
        assert card.startswith("---\nlibrary_name: robust-ensembles") and f"### Evaluate job `{ev}`" in card
        assert "plain torch, untrained" in page.locator("#model-training").inner_text()
        if shots:
            page.screenshot(path=str(Path(shots) / "model_with_record.png"), full_page=True)
        # a model that does not exist (or is another owner's): the page says so, nothing leaks
        page.goto(f"{url}/ui/#/models/00000000-0000-4000-8000-000000000000")
        page.wait_for_selector("body[data-ready]", state="attached")
        assert "no model with id" in page.locator("#banner").inner_text()
        failed[:] = [f for f in failed if "/v1/models/00000000-0000-4000-8000-000000000000" not in f]
        errors[:] = [e for e in errors if "404" not in e]
        context.close()
        browser.close()
    assert not errors, errors
    assert not failed, failed
