"""The dashboard's *New job* form and *Clone with changes* in headless Chromium (issue #24).

Setting: uvicorn serves ``create_app`` on 127.0.0.1 over an embedded PostgreSQL with API tokens on; the
token is in the browser's ``localStorage``; Debian's ``chromium`` is driven by Playwright, under the
service's CSP. No worker runs: the jobs stay queued, what is checked is what the API stored.

The form is generated from ``GET /v1/specs`` and ``GET /v1/methods``: bounds become the inputs' min/max,
enums selects, booleans checkboxes, a method's hyperparameters a fieldset that follows the chosen method.
An invalid value (epochs 0, a hyperparameter at its exclusive maximum, an evaluate job naming no job) is
refused by the API and its own 422 message appears at the field it names, word for word the message the
API gives for the request the page sent (replayed with httpx); nothing is stored. A valid train spec lands
on the new job's page and the API holds the spec entered. A clone of that job with one field changed
stores a spec that differs from the original's in that field only.

Without a browser the test fails unless ``RE_SKIP_BROWSER=1`` (then it skips), as test_dashboard_browser.py;
``RE_DASHBOARD_SCREENSHOTS=<dir>`` saves a screenshot of each step.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_dashboard_browser import chromium  # noqa: F401 (the fixture)

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.client import Client
from service.db import make_engine
from service.settings import Settings

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture()
def served(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Client]]:
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
    try:
        yield url, token, client
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
        engine.dispose()


def api_422(url: str, token: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The API's own answer to ``body`` (a 422 expected): its error items."""
    r = httpx.post(f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 422, (r.status_code, r.text)
    return r.json()["detail"]


def test_submit_and_clone_from_the_dashboard(chromium: str | None,  # noqa: F811
                                             served: tuple[str, str, Client]) -> None:
    url, token, client = served
    if chromium is None:
        pytest.skip("RE_SKIP_BROWSER=1: the browser part is skipped")
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    bad_responses: list[str] = []
    posts: list[dict[str, Any]] = []
    shots = os.environ.get("RE_DASHBOARD_SCREENSHOTS")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context()
        context.add_init_script(f"window.localStorage.setItem('re_api_token', {json.dumps(token)});")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed {r.method} {r.url}: {r.failure}"))
        page.on("response", lambda r: bad_responses.append(f"{r.status} {r.request.method} {r.url}")
                if r.status >= 400 else None)
        page.on("request", lambda r: posts.append(json.loads(r.post_data or "null"))
                if r.method == "POST" and r.url.endswith("/v1/jobs") else None)

        def ready(name: str) -> None:
            page.wait_for_selector("body[data-ready]", state="attached")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)
            assert page.locator("#banner").is_hidden(), page.locator("#banner").inner_text()
            # the schemas' own descriptions (hints) may say "null disables": leaks are looked for elsewhere
            text = page.evaluate("() => { const c = document.getElementById('app').cloneNode(true);"
                                 " c.querySelectorAll('pre, .hint').forEach((e) => e.remove());"
                                 " return c.textContent; }")
            assert not re.search(r"\b(null|undefined|NaN)\b|\[object ", text), text

        def field(key: str) -> Any:
            return page.locator(f'[name="{key}"]')

        def error_at(key: str) -> str:
            box = page.locator(f'[data-error-for="{key}"]')
            box.wait_for(state="visible")
            return box.inner_text()

        def submit_and_wait_for_errors() -> None:
            n = len(posts)
            page.click("#submit-job")
            page.wait_for_selector("#submit-errors:not([hidden])")
            assert len(posts) == n + 1

        # ---------------------------------------------------------------- the form, from the schemas
        page.goto(f"{url}/ui/")
        ready("jobs")
        page.click("#nav-new")
        page.wait_for_selector("#new-job-form")
        ready("new-job")
        assert page.input_value("#new-kind") == "train"
        epochs = field("spec.epochs")
        assert (epochs.get_attribute("type"), epochs.get_attribute("min"), epochs.get_attribute("max")) == \
            ("number", "1", "1000")
        assert epochs.input_value() == "2"  # TrainSpec's default
        assert field("spec.use_gpu").get_attribute("type") == "checkbox"
        methods = [m["name"] for m in client.methods()]
        assert client.specs()["kinds"]["train"]["properties"]["method"]["enum"] == methods
        assert field("spec.method").locator("option").evaluate_all("os => os.map((o) => o.value)") == methods
        assert "sgd" in field("spec.optimizer.name").locator("option").all_inner_texts()
        hp = field("spec.hyperparameters.label_smoothing")
        assert hp.input_value() == "0" and hp.get_attribute("min") == "0"
        assert "label smoothing" in page.inner_text('[data-field="spec.hyperparameters.label_smoothing"]')
        # another method, another fieldset; the members default follows the method
        field("spec.method").select_option("dkd")
        page.wait_for_selector('#hp-fields legend:has-text("dkd")')
        assert field("spec.hyperparameters.label_smoothing").count() == 0
        dkd = next(m for m in client.methods() if m["name"] == "dkd")
        assert field("spec.members").input_value() == str(dkd["default_members"])
        field("spec.method").select_option("baseline")
        page.wait_for_selector('[name="spec.hyperparameters.label_smoothing"]')

        # ---------------------------------------------------------------- invalid values: the API's messages
        field("spec.members").fill("2")
        field("spec.train_subset").fill("300")
        field("spec.epochs").fill("0")
        submit_and_wait_for_errors()
        ready("new-job-422-epochs")
        sent = posts[-1]
        assert sent == {"kind": "train", "spec": {"method": "baseline", "dataset": "mnist", "members": 2,
                                                  "train_subset": 300, "epochs": 0}}, sent
        expected = api_422(url, token, sent)
        assert [e["field"] for e in expected] == ["spec.epochs"], expected
        assert error_at("spec.epochs") == expected[0]["msg"]  # e.g. "Input should be greater than or equal to 1"
        assert "spec.epochs: " + expected[0]["msg"] in page.inner_text("#submit-errors")
        assert page.evaluate("document.activeElement.name") == "spec.epochs"
        assert client.jobs()["total"] == 0

        field("spec.epochs").fill("1")
        field("spec.hyperparameters.label_smoothing").fill("1")  # exclusiveMaximum 1
        submit_and_wait_for_errors()
        ready("new-job-422-hyperparameter")
        assert page.locator('[data-error-for="spec.epochs"]').is_hidden()  # fixed: its message is gone
        expected = api_422(url, token, posts[-1])
        assert [e["field"] for e in expected] == ["spec.hyperparameters.label_smoothing"], expected
        assert error_at("spec.hyperparameters.label_smoothing") == expected[0]["msg"]
        assert client.jobs()["total"] == 0

        # ---------------------------------------------------------------- a valid train job
        field("spec.hyperparameters.label_smoothing").fill("0.1")
        field("tags").fill("browser, form")
        field("note").fill("from the dashboard")
        field("spec.optimizer.lr").fill("0.002")
        page.click("#submit-job")
        page.wait_for_url(re.compile(rf".*#/jobs/{UUID}$"))
        page.wait_for_selector("#job-facts")
        ready("submitted-job")
        job_id = page.url.rsplit("/", 1)[1]
        job = client.job(job_id)
        assert job["kind"] == "train" and job["status"] == "queued" and job["owner"] == "alice"
        spec = job["spec"]
        assert (spec["method"], spec["dataset"], spec["members"], spec["epochs"], spec["train_subset"]) == \
            ("baseline", "mnist", 2, 1, 300)
        assert spec["hyperparameters"] == {"label_smoothing": 0.1}
        assert spec["optimizer"]["lr"] == 0.002
        assert job["tags"] == ["browser", "form"] and job["note"] == "from the dashboard"
        assert client.jobs()["total"] == 1

        # ---------------------------------------------------------------- clone with one change
        page.click("#clone-btn")
        page.wait_for_selector("#new-job-form")
        ready("clone")
        assert page.locator("#new-kind").is_disabled() and page.input_value("#new-kind") == "train"
        assert field("spec.epochs").input_value() == "1" and field("spec.members").input_value() == "2"
        assert field("spec.hyperparameters.label_smoothing").input_value() == "0.1"
        assert field("tags").input_value() == "browser, form"
        field("spec.seed").fill("7")
        page.click("#submit-job")
        page.wait_for_url(re.compile(rf".*#/jobs/{UUID}$"))
        page.wait_for_selector("#job-facts")
        ready("cloned-job")
        clone_id = page.url.rsplit("/", 1)[1]
        assert clone_id != job_id
        clone = client.job(clone_id)
        assert clone["kind"] == "train" and clone["tags"] == job["tags"] and clone["note"] == job["note"]
        changed = {k for k in spec.keys() | clone["spec"].keys() if spec.get(k) != clone["spec"].get(k)}
        assert changed == {"seed"}, (spec, clone["spec"])
        assert clone["spec"]["seed"] == 7 and spec["seed"] == 0
        assert client.jobs()["total"] == 2

        # a clone with another method: the old method's hyperparameters are dropped, the new one's form is shown
        page.goto(f"{url}/ui/#/new?clone={job_id}")
        page.wait_for_selector("#new-job-form")
        ready("clone-other-method")
        field("spec.method").select_option("dverge")
        page.wait_for_selector('[name="spec.hyperparameters.steps"]')
        field("spec.hyperparameters.steps").fill("3")
        page.click("#submit-job")
        page.wait_for_url(re.compile(rf".*#/jobs/(?!{clone_id}){UUID}$"))
        page.wait_for_selector("#job-facts")
        other = client.job(page.url.rsplit("/", 1)[1])
        assert other["spec"]["method"] == "dverge" and other["spec"]["hyperparameters"]["steps"] == 3
        assert set(other["spec"]["hyperparameters"]) == set(client.method("dverge")["hyperparameters"])
        changed = {k for k in spec.keys() | other["spec"].keys() if spec.get(k) != other["spec"].get(k)}
        assert changed <= {"method", "hyperparameters", "combine"}, (spec, other["spec"])
        assert client.jobs()["total"] == 3

        # ---------------------------------------------------------------- other kinds: tune, evaluate
        page.goto(f"{url}/ui/#/new?kind=tune")
        page.wait_for_selector('[name="spec.search_space"]')
        ready("new-tune")
        assert field("spec.base").evaluate("e => e.tagName") == "TEXTAREA"  # a train spec, as JSON text
        assert field("spec.scheduler").locator("option").all_inner_texts() == ["asha", "pbt", "fifo"]
        page.select_option("#new-kind", "evaluate")
        page.wait_for_selector('[name="spec.target_job"]')
        ready("new-evaluate")
        assert field("spec.split").evaluate("e => e.tagName") == "SELECT"
        field("spec.target_job").fill("not-a-job")
        submit_and_wait_for_errors()
        expected = api_422(url, token, posts[-1])
        assert posts[-1] == {"kind": "evaluate", "spec": {"target_job": "not-a-job"}}
        assert error_at("spec.target_job") == expected[0]["msg"]
        field("spec.attacks").fill("[{")  # text that is not JSON: shown at the field, nothing sent
        n = len(posts)
        page.click("#submit-job")
        assert error_at("spec.attacks").startswith("not valid JSON")
        assert len(posts) == n
        assert client.jobs()["total"] == 3
        browser.close()

    # the API's 422s are the only answers >= 400, and Chromium's console line for each is the only console error
    assert bad_responses and all(r.startswith("422 POST ") and r.endswith("/v1/jobs") for r in bad_responses), \
        bad_responses
    others = [p for p in problems if "status of 422" not in p]
    assert not others, others  # no CSP violation, no script error


def test_the_job_list_filters_by_method_dataset_tag_text_and_date(chromium: str | None,  # noqa: F811
                                                                  served: tuple[str, str, Client]) -> None:
    url, token, client = served
    if chromium is None:
        pytest.skip("RE_SKIP_BROWSER=1: the browser part is skipped")
    from playwright.sync_api import sync_playwright

    small = {"members": 2, "epochs": 1, "train_subset": 500}
    a = client.submit("train", {**small, "method": "pdd", "dataset": "mnist"}, tags=["sweep"], note="needle one")
    b = client.submit("train", {**small, "method": "gal", "dataset": "fashion_mnist"}, tags=["sweep", "big"])
    c = client.submit("train", {**small, "method": "pdd", "dataset": "fashion_mnist"}, note="other")
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context()
        context.add_init_script(f"window.localStorage.setItem('re_api_token', {json.dumps(token)});")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        def shown() -> set[str]:
            page.wait_for_selector("#jobs-table, #jobs .muted, #jobs-error")
            return set(page.locator("#jobs-table tbody tr").evaluate_all("rs => rs.map((r) => r.dataset.jobId)"))

        def expect(ids: set[str]) -> None:
            deadline = time.monotonic() + 20
            while shown() != ids:
                assert time.monotonic() < deadline, (shown(), ids)
                time.sleep(0.2)

        page.goto(f"{url}/ui/")
        page.wait_for_selector("body[data-ready]", state="attached")
        expect({a["id"], b["id"], c["id"]})
        # the method and data-set lists come from the registry; choosing one goes into the address and the query
        assert "dverge" in page.locator("#filter-method option").all_inner_texts()
        page.select_option("#filter-method", "pdd")
        expect({a["id"], c["id"]})
        assert "method=pdd" in page.url
        page.select_option("#filter-dataset", "fashion_mnist")
        expect({c["id"]})
        page.select_option("#filter-method", "")
        expect({b["id"], c["id"]})
        page.fill("#filter-tag", "sweep")
        page.press("#filter-tag", "Enter")
        expect({b["id"]})
        # a reload keeps the filters (they live in the address)
        page.reload()
        expect({b["id"]})
        assert page.input_value("#filter-tag") == "sweep" and page.input_value("#filter-dataset") == "fashion_mnist"
        # free text over id, note and tags; then dates: every job was created today
        page.goto(f"{url}/ui/#/?q=needle")
        expect({a["id"]})
        today = time.strftime("%Y-%m-%d", time.gmtime())
        page.goto(f"{url}/ui/#/?since={today}")
        expect({a["id"], b["id"], c["id"]})
        page.goto(f"{url}/ui/#/?until={today}")
        expect(set())
        # a filter the API refuses (until before since) shows the API's message instead of an empty list
        page.goto(f"{url}/ui/#/?since={today}&until=2000-01-01")
        page.wait_for_selector("#jobs-error")
        assert "until" in page.inner_text("#jobs-error")
        browser.close()
    assert [p for p in problems if "422" not in p] == [], problems
