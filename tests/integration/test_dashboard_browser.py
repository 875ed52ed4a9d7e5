"""The web dashboard in headless Chromium against a real running service with real finished jobs.

Setting: uvicorn serves ``create_app`` on 127.0.0.1 over an embedded PostgreSQL, with API tokens on.
Two tiny train jobs (baseline, LeNet-5, MNIST subsets of a few hundred images, 2 epochs) and one
evaluate job (FGSM on 100 test images) are submitted through the HTTP client and run by a real
:class:`~workers.worker.Worker` in this process: the evaluate job with the service's own runner, the
train jobs with ``train_ensemble`` in-process (the Ray runner's work without Ray, to keep the test
cheap) feeding the worker's ``JobRun.on_epoch``, which stores the metrics and writes the TensorBoard
events artifact. The browser (Debian's ``chromium`` driven by Playwright) must show those jobs' real
numbers on the job list, job and comparison pages, with no console errors and no failed request.
Last, a job page left open follows a job that starts, reports an epoch and finishes (the test plays
the worker's part through the real queue there, with numbers of its own).

Without a browser the test fails (it does not skip) unless ``RE_SKIP_BROWSER=1`` is set. With
``RE_DASHBOARD_SCREENSHOTS=<dir>`` it saves a full-page screenshot of every page it checks there.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.client import Client
from service.db import make_engine
from service.queue import Queue
from service.settings import Settings
from workers.tfevents import TENSORBOARD_DIR
from workers.worker import JobRun, Worker, run_evaluate

pytestmark = pytest.mark.integration

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
TRAIN_A = {"method": "baseline", "members": 2, "epochs": 2, "train_subset": 300, "batch_size": 100,
           "eval_subset": 200, "seed": 0}
TRAIN_B = {**TRAIN_A, "members": 3, "train_subset": 200, "seed": 1}
EVALUATE = {"n_examples": 60, "batch_size": 60, "attacks": [{"name": "fgsm", "eps": [0.1, 0.2, 0.3]}],
            "member_transfer": None, "checks": {"large_eps": None, "convergence": False}}


@pytest.fixture()
def chromium() -> str | None:
    """The Chromium executable. A missing browser (or Playwright) fails the test before any work, unless
    ``RE_SKIP_BROWSER=1``: then None, and the test skips its browser part."""
    skip = os.environ.get("RE_SKIP_BROWSER") == "1"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if skip:
            return None
        pytest.fail("playwright is not installed (pip install -r requirements.txt); RE_SKIP_BROWSER=1 skips this")
    explicit = os.environ.get("RE_CHROMIUM")
    for candidate in ((explicit,) if explicit else CHROMIUM_CANDIDATES):
        if candidate and (Path(candidate).is_file() or shutil.which(candidate)):
            return candidate
    if skip:
        return None
    pytest.fail("no Chromium found (Debian: apt-get install chromium, done by `make install` as root); "
                "set RE_CHROMIUM to its path, or RE_SKIP_BROWSER=1 to skip the browser part")


def train_in_process(run: JobRun) -> dict[str, Any]:
    """The train runner's work without Ray: same epochs callback, artifacts and result shape."""
    from ensemble_core.checkpoint import save_checkpoint
    from ensemble_core.training import TrainHooks, train_ensemble

    out = train_ensemble(dict(run.lease.spec), device="cpu",
                         hooks=TrainHooks(on_epoch_end=lambda m, _state: run.on_epoch(m), log=run.log,
                                          should_stop=run.should_stop))
    assert out.state is not None
    save_checkpoint(out.state, run.artifacts_dir / "ensemble.pt")
    results = {**out.results, "history": out.history}
    (run.artifacts_dir / "results.json").write_text(json.dumps({"metrics": out.metrics, **results}, indent=2))
    return {"metrics": out.metrics, "results": results, "checkpoint": "ensemble.pt"}


@dataclass
class Service:
    url: str
    token: str
    client: Client
    settings: Settings
    queue: Queue
    train_a: str
    train_b: str
    evaluate: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def service(pg_url: str, tmp_path: Path) -> Iterator[Service]:
    import uvicorn

    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, poll_seconds=0.5,
                        retry_backoff_seconds=0.0, default_max_attempts=1)
    engine = make_engine(pg_url)
    token, _ = TokenStore(engine).create("alice", name="dashboard test")
    app = create_app(settings, engine=engine, warm=False)
    port = _free_port()
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
        a = client.submit("train", TRAIN_A)["id"]
        b = client.submit("train", TRAIN_B)["id"]
        e = client.submit("evaluate", {**EVALUATE, "target_job": a})["id"]
        worker = Worker(settings, runners={"train": train_in_process, "evaluate": run_evaluate})
        worker.run(max_jobs=3)
        for job_id in (a, b, e):
            job = client.job(job_id)
            assert job["status"] == "succeeded", (job["status"], job["error"])
        yield Service(url, token, client, settings, app.state.queue, a, b, e)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)
        engine.dispose()


def as_shown(v: float) -> str:
    """A number as the dashboard's ``fmtNum`` shows it."""
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if 0 < a < 0.001:
        mantissa, exp = f"{v:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    return f"{v:.4f}"


def _last(points: list[dict[str, Any]], name: str) -> dict[str, Any]:
    mine = [p for p in points if p["name"] == name]
    return max(mine, key=lambda p: p["step"])


def check_tensorboard_artifact(service: Service, tmp_path: Path) -> None:
    """The train job's event file, downloaded through the artifacts endpoint, holds every stored metric point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = service.client
    names = [a["name"] for a in c.artifacts(service.train_a)["items"]]
    events = [n for n in names if n.startswith(f"{TENSORBOARD_DIR}/events.out.tfevents.")]
    assert len(events) == 1 and events[0].endswith(".attempt1"), names
    logdir = tmp_path / "downloaded"
    logdir.mkdir()
    c.download(service.train_a, events[0], logdir)
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    stored = c.metrics(service.train_a)["items"]
    assert sorted(acc.Tags()["scalars"]) == sorted({p["name"] for p in stored})
    for p in stored:
        got = {e.step: e.value for e in acc.Scalars(p["name"])}
        assert got[p["step"]] == pytest.approx(p["value"], rel=1e-6, abs=1e-7), p  # float32 in the file


def test_dashboard_pages_show_the_finished_jobs(chromium: str | None, service: Service, tmp_path: Path) -> None:
    """One service, three real finished jobs: the TensorBoard artifact, then every dashboard page in Chromium."""
    check_tensorboard_artifact(service, tmp_path)
    if chromium is None:
        pytest.skip("RE_SKIP_BROWSER=1: the browser part is skipped")
    from playwright.sync_api import sync_playwright

    c = service.client
    result_a, result_b, result_e = (c.results(j) for j in (service.train_a, service.train_b, service.evaluate))
    points_a = c.metrics(service.train_a)["items"]
    errors: list[str] = []
    failed: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(accept_downloads=True)
        # the token the page would keep after "Save": every /v1 request must carry it (auth is on)
        context.add_init_script(f"window.localStorage.setItem('re_api_token', {json.dumps(service.token)});")
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
                                 " c.querySelectorAll('pre, details').forEach((e) => e.remove());"
                                 " return c.textContent; }")
            assert not re.search(r"\b(null|undefined|NaN)\b|\[object ", text), text  # no leaked JS values

        # ---- job list (the service's root redirects to the dashboard)
        page.goto(service.url + "/")
        assert page.url == f"{service.url}/ui/"
        ready("jobs")
        rows = page.locator("#jobs-table tbody tr")
        assert rows.count() == 3
        for job_id, method in ((service.train_a, "baseline"), (service.train_b, "baseline"),
                               (service.evaluate, f"target {service.train_a[:8]}")):
            row = page.locator(f'tr[data-job-id="{job_id}"]')
            assert row.locator(".status").inner_text() == "succeeded"
            assert method in row.inner_text() and "100%" in row.inner_text()

        # ---- a train job's page: final metrics, last-epoch metrics, curves, logs, artifacts, spec
        page.goto(f"{service.url}/ui/#/jobs/{service.train_a}")
        ready("train_job")
        assert page.locator('dd[data-fact="status"]').inner_text() == "succeeded"
        for name, value in result_a["metrics"].items():
            assert page.locator(f'#final-metrics td[data-metric="{name}"]').inner_text() == as_shown(value)
        for name in ("train_loss", "sel_clean_acc", "lr"):
            want = as_shown(_last(points_a, name)["value"])
            assert page.locator(f'#last-epoch td[data-metric="{name}"]').inner_text() == want
        loss_chart = page.locator('[data-chart="Training loss"]')
        assert loss_chart.locator('g[data-series="train_loss"] circle').count() == TRAIN_A["epochs"]
        first_loss = min((p for p in points_a if p["name"] == "train_loss"), key=lambda p: p["step"])
        tip = loss_chart.locator('g[data-series="train_loss"] circle title').first.text_content()
        assert tip == f"train_loss, epoch 1: {as_shown(first_loss['value'])}"
        acc_chart = page.locator('[data-chart="Accuracy"]')
        assert acc_chart.locator("g[data-series]").count() == 1 + TRAIN_A["members"]  # ensemble + members
        assert "succeeded" in page.locator("#logs").inner_text()
        artifact_names = page.locator("#artifacts-table a[data-artifact]").all_inner_texts()
        assert {"ensemble.pt", "results.json"} <= set(artifact_names)
        assert any(n.startswith("tensorboard/events.out.tfevents.") for n in artifact_names)
        assert json.loads(page.locator("#spec").inner_text())["members"] == TRAIN_A["members"]
        with page.expect_download() as dl:
            page.locator('#artifacts-table a[data-artifact="results.json"]').click()
        saved = tmp_path / "results.json"
        dl.value.save_as(saved)
        on_disk = service.settings.job_artifacts_dir(service.train_a) / "results.json"
        assert saved.read_bytes() == on_disk.read_bytes()

        # ---- the evaluate job's page: robustness tables and the accuracy-vs-eps plot
        page.goto(f"{service.url}/ui/#/jobs/{service.evaluate}")
        ready("evaluate_job")
        tables = {t["name"]: t for t in result_e["tables"]}
        white_box = tables["white_box_Linf"]
        shown = page.locator('table[data-table="white_box_Linf"]')
        assert shown.locator("th").all_inner_texts() == white_box["columns"]
        shown_rows = [r.locator("td").all_inner_texts() for r in shown.locator("tbody tr").all()]
        assert shown_rows == [[str(x) for x in r] for r in white_box["rows"]]
        assert page.locator('table[data-table="clean"] tbody td').nth(2).inner_text() == tables["clean"]["rows"][0][2]
        page.wait_for_function(
            "() => { const i = document.querySelector('img[data-artifact=\"robust_acc_vs_eps_Linf.png\"]');"
            " return i && i.complete && i.naturalWidth > 100; }")

        # ---- comparison: select both train jobs on the list and press "Compare selected"
        page.goto(f"{service.url}/ui/#/")
        ready("jobs_again")
        for job_id in (service.train_a, service.train_b):
            page.locator(f'tr[data-job-id="{job_id}"] input[type="checkbox"]').check()
        page.locator("#compare-btn").click()
        page.wait_for_url("**/ui/#/compare?ids=*")
        page.wait_for_selector("#compare-results-table")
        ready("compare")
        labels = [f"{service.train_a[:8]} (baseline)", f"{service.train_b[:8]} (baseline)"]
        assert page.locator("#compare-table thead th").all_inner_texts() == ["", *labels]
        assert page.locator("#compare-results-table thead th").all_inner_texts() == ["metric", *labels]
        for job_id, result in ((service.train_a, result_a), (service.train_b, result_b)):
            for name, value in result["metrics"].items():
                cell = page.locator(f'#compare-results-table td[data-job="{job_id}"][data-metric="{name}"]')
                assert cell.inner_text() == as_shown(value)
        curves = page.locator('#compare-curves [data-chart="train_loss"] g[data-series]')
        assert curves.count() == 2
        assert "members" in page.locator("#compare-spec").inner_text()  # 2 vs 3 members differ

        # ---- live refresh: the page of a queued job follows it while it runs and when it finishes
        live = c.submit("train", {**TRAIN_A, "seed": 2})["id"]
        page.goto(f"{service.url}/ui/#/jobs/{live}")
        ready("live_queued")
        assert page.locator('dd[data-fact="status"]').inner_text() == "queued"
        lease = service.queue.claim("browser-test")
        assert lease is not None and str(lease.job_id) == live
        run = JobRun(lease, service.queue, service.settings, threading.Event())
        run.log("stage 1 epoch 1 | loss 1.2345")
        run.on_epoch({"global_epoch": 1, "epoch": 1, "total_epochs": 2, "stage": 0, "stage_name": "all",
                      "train_loss": 1.2345, "sel_clean_acc": 0.5})
        page.wait_for_selector('dd[data-fact="status"] [data-status="running"]')
        page.wait_for_function("() => document.querySelector('dd[data-fact=\"progress\"]').textContent === '50%'")
        assert page.locator('#last-epoch td[data-metric="train_loss"]').inner_text() == "1.2345"
        assert page.locator('dd[data-fact="stage / epoch"]').inner_text() == "all, epoch 1/2"
        page.wait_for_function("() => document.getElementById('logs').textContent.includes('loss 1.2345')")
        assert service.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.75}})
        page.wait_for_selector('dd[data-fact="status"] [data-status="succeeded"]')
        assert page.locator('#final-metrics td[data-metric="test_clean_acc"]').inner_text() == "0.7500"
        ready("live_finished")

        context.close()
        browser.close()

    assert not errors, errors
    assert not failed, failed
