"""Regression tests for the findings of the independent black-box probe (issue #27).

Each test failed on the code before its fix. Real PostgreSQL; no Ray (the test plays the worker's part
through the real queue where a job must be running). The Ray-on-loopback finding is tested in
``test_ray_loopback.py``, the dashboard's compare page in ``test_dashboard_compare_ids.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.queue import Queue
from service.settings import Settings, load_settings

pytestmark = pytest.mark.integration

TRAIN = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 500}
TUNE = {"base": {"members": 2, "epochs": 1}, "num_samples": 2,
        "search_space": {"hyperparameters.label_smoothing": {"type": "choice", "values": [0.0, 0.1]}}}
NAME_LENGTHS = (255, 256, 300, 4096, 8000)
SECURITY_HEADERS = ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy")


@dataclass
class Env:
    client: TestClient
    queue: Queue
    settings: Settings
    tokens: TokenStore
    alice: str
    bob: str
    admin: str

    def h(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def submit(self, token: str, kind: str, spec: dict[str, Any], **headers: str) -> Any:
        return self.client.post("/v1/jobs", json={"kind": kind, "spec": spec}, headers={**self.h(token), **headers})

    def get(self, token: str | None, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=self.h(token), **kw)


@pytest.fixture()
def env(pg_url: str, tmp_path: Path) -> Iterator[Env]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, retry_backoff_seconds=0.0)
    app = create_app(settings, warm=False)
    tokens = TokenStore(app.state.queue.engine)
    alice, _ = tokens.create("alice")
    bob, _ = tokens.create("bob")
    admin, _ = tokens.create("ops", admin=True)
    # server errors come back as 500 answers (as a real server sends them), not as exceptions in the test
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(client, app.state.queue, settings, tokens, alice, bob, admin)


# ---------------------------------------------------------------------------------------------- 1. long names
@pytest.mark.parametrize("n", NAME_LENGTHS)
def test_long_names_answer_404_never_5xx_and_log_no_traceback(env: Env, n: int,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    job = env.submit(env.alice, "train", TRAIN).json()["id"]
    art = env.settings.job_artifacts_dir(job)
    art.mkdir(parents=True)
    (art / "ok.txt").write_text("ok")
    caplog.set_level(logging.INFO)
    paths = [f"/ui/static/{'a' * n}.js", f"/ui/static/{'b' * n}", f"/v1/jobs/{job}/artifacts/{'c' * n}",
             f"/v1/jobs/{job}/artifacts/d/{'e' * n}.txt", f"/v1/jobs/{job}/artifacts/{'f/' * (n // 2)}ok.txt"]
    for path in paths:
        r = env.get(env.alice, path)
        assert r.status_code == 404, (n, path[:80], r.status_code)
        assert len(r.content) < 2 * n + 200  # the answer does not grow much beyond the name it quotes
    assert env.get(env.alice, f"/v1/jobs/{job}/artifacts/ok.txt").content == b"ok"
    tracebacks = [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]
    assert not tracebacks, [rec.getMessage()[:200] for rec in tracebacks]


# ---------------------------------------------------------------------------------------------- 2. idempotency
def test_idempotency_keys_are_scoped_to_their_owner(env: Env) -> None:
    key = {"Idempotency-Key": "nightly-2026-11-22"}
    first = env.submit(env.alice, "train", TRAIN, **key)
    assert first.status_code == 201, first.text
    # another owner's use of the same key is invisible: bob gets his own job, not a 409
    bobs = env.submit(env.bob, "train", TRAIN, **key)
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"], bobs.text
    assert bobs.json()["owner"] == "bob" and "idempotent-replayed" not in bobs.headers
    # replays within one owner behave as before: the same job, and 409 for a different request
    for token, job in ((env.alice, first.json()), (env.bob, bobs.json())):
        replay = env.submit(token, "train", TRAIN, **key)
        assert replay.status_code == 201 and replay.json()["id"] == job["id"]
        assert replay.headers["idempotent-replayed"] == "true"
        other = env.submit(token, "train", {**TRAIN, "epochs": 2}, **key)
        assert other.status_code == 409 and job["id"] in other.json()["detail"], other.text
    assert env.get(env.admin, "/v1/jobs").json()["total"] == 2
    # the admin has a namespace of its own too (it acts on every job, but keys are the caller's)
    r = env.submit(env.admin, "train", TRAIN, **key)
    assert r.status_code == 201 and r.json()["owner"] == "ops" and "idempotent-replayed" not in r.headers


def test_keys_in_the_workers_trial_format_are_refused_with_422(env: Env) -> None:
    tune = env.submit(env.bob, "tune", TUNE).json()["id"]
    for key in (f"trial:{tune}:t1", "trial:anything", "TRIAL:x"):
        r = env.submit(env.alice, "train", TRAIN, **{"Idempotency-Key": key})
        assert r.status_code == 422, (key, r.status_code, r.text)
        assert r.json()["detail"][0]["field"] == "header.Idempotency-Key", r.text
        r = env.client.post(f"/v1/jobs/{tune}/train-best", headers={**env.h(env.bob), "Idempotency-Key": key})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "header.Idempotency-Key", r.text
    assert env.get(env.admin, "/v1/jobs").json()["total"] == 1


def test_the_trial_upsert_rewrites_only_its_own_tune_jobs_trials(env: Env) -> None:
    tune = env.submit(env.bob, "tune", TUNE).json()["id"]
    # a row a user made with the trial format before keys were checked (written here through the queue)
    user_job, created = env.queue.submit("train", {"method": "baseline", "mine": True}, owner="alice",
                                         idempotency_key=f"trial:{tune}:t1")
    assert created
    trials = [{"trial_id": "t1", "status": "TERMINATED", "config": {"lr": 0.1}, "val_acc": 0.5}]
    for _ in range(2):  # the worker mirrors the trials after every result: a second pass updates its own row
        assert env.queue.upsert_trials(uuid.UUID(tune), trials) == 1
    mine = env.get(env.alice, f"/v1/jobs/{user_job['id']}").json()
    assert mine["kind"] == "train" and mine["owner"] == "alice" and mine["spec"] == {"method": "baseline",
                                                                                      "mine": True}
    assert mine["status"] == "queued" and mine["parent_id"] is None
    listed = env.get(env.bob, f"/v1/jobs/{tune}/trials").json()
    assert listed["total"] == 1 and listed["items"][0]["owner"] == "bob"
    assert listed["items"][0]["spec"] == {"trial_id": "t1", "config": {"lr": 0.1}}
    with env.queue.engine.connect() as c:
        idx = c.execute(text("SELECT indexdef FROM pg_indexes WHERE tablename = 'jobs' "
                             "AND indexdef LIKE '%idempotency_key%'")).scalars().all()
    assert idx and all("owner" in d or "parent_id" in d for d in idx), idx


# ---------------------------------------------------------------------------------------------- 3. revocation
def test_revoking_a_token_closes_its_open_log_streams_within_seconds(env: Env) -> None:
    jid = env.submit(env.alice, "train", TRAIN).json()["id"]
    lease = env.queue.claim("w")
    assert lease is not None and str(lease.job_id) == jid
    env.queue.append_logs(lease.job_id, ["before revoke"], lease.attempt)
    body: dict[str, Any] = {}

    def follow() -> None:
        r = env.get(env.alice, f"/v1/jobs/{jid}/logs", params={"follow": "true"})
        body["text"], body["at"] = r.text, time.monotonic()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(1.5)  # the stream is open (the token was checked when it started)
    listed = {t["owner"]: t for t in env.tokens.list()}
    env.tokens.revoke(str(listed["alice"]["id"]))
    revoked_at = time.monotonic()
    for i in range(16):  # the job goes on writing lines for 8 s
        env.queue.append_logs(lease.job_id, [f"after revoke {i}"], lease.attempt)
        reader.join(0.5)
        if not reader.is_alive():
            break
    still_open = reader.is_alive()
    env.queue.succeed(lease, {"metrics": {}})  # ends the stream if it is still open, so the test ends
    reader.join(10)
    assert not still_open, "the stream was still open 8 s after its token was revoked"
    closed_after = body["at"] - revoked_at
    assert closed_after < 5.0, closed_after
    assert "before revoke" in body["text"] and "after revoke 9" not in body["text"], body["text"][-500:]
    assert "revoked" in body["text"]
    # a stream of a token that stays valid is not affected
    assert "after revoke" in env.get(env.admin, f"/v1/jobs/{jid}/logs").text


# ---------------------------------------------------------------------------------------------- 5. weaker points
def test_the_422_error_list_is_capped_and_huge_specs_are_refused_cheaply(env: Env) -> None:
    def post(body: Any) -> tuple[Any, float]:
        raw = json.dumps(body)
        t0 = time.monotonic()
        r = env.client.post("/v1/jobs", content=raw, headers={**env.h(env.alice), "Content-Type": "application/json"})
        return r, time.monotonic() - t0

    # 15,000 unknown keys: as many errors, of which the answer lists 50 and counts the rest
    r, _ = post({"kind": "train", "spec": {**TRAIN, **{f"x{i}": i for i in range(15_000)}}})
    assert r.status_code == 422, r.status_code
    detail = r.json()["detail"]
    assert len(detail) == 51 and len(r.content) < 64 * 1024, (len(detail), len(r.content))
    assert detail[0]["field"] == "spec.x0" and detail[-1]["msg"].startswith("... and 14950 more errors"), detail[-1]
    # the request model's own errors (unknown top-level fields) are capped too
    r, _ = post({"kind": "train", "spec": TRAIN, **{f"z{i}": i for i in range(5_000)}})
    assert r.status_code == 422 and len(r.json()["detail"]) == 51 and len(r.content) < 64 * 1024
    assert "4950 more errors" in r.json()["detail"][-1]["msg"]
    # a body of ~1 MiB with more values than any valid spec has is refused before validation
    r, took = post({"kind": "train", "spec": {**TRAIN, **{f"k{i}": i for i in range(60_000)}}})
    assert r.status_code == 422 and len(r.json()["detail"]) == 1, r.text[:300]
    assert r.json()["detail"][0]["field"] == "spec" and "more than 20000 values" in r.json()["detail"][0]["msg"]
    assert took < 5.0, took
    assert env.get(env.admin, "/v1/jobs").json()["total"] == 0


def test_readyz_shows_no_internals_to_anonymous_callers(tmp_path: Path) -> None:
    sock_dir = tmp_path / "no-such-socket-dir"
    url = f"postgresql+psycopg://postgres:@/robust_ensembles?host={sock_dir}&connect_timeout=2"
    for auth, shows in ((True, False), (False, True)):
        app = create_app(Settings(data_dir=tmp_path, database_url=url, auth=auth), warm=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.get("/readyz", headers={"Host": "localhost"})
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert detail.startswith("database not ready")
        if not shows:  # auth on: anonymous; no exception text, socket path or driver name
            assert str(sock_dir) not in r.text and "Error" not in r.text and "psycopg" not in r.text, r.text
        else:  # auth off: the local admin (on an allowed Host) sees the cause
            assert str(sock_dir) in r.text or "Error" in r.text, r.text


def test_every_response_carries_security_headers(env: Env) -> None:
    jid = env.submit(env.alice, "train", TRAIN).json()["id"]
    answers = [env.get(None, "/ui/"), env.get(None, "/ui/static/app.js"), env.get(None, "/healthz"),
               env.get(None, "/docs"), env.get(None, "/openapi.json"), env.get(None, "/v1/jobs"),
               env.get(env.alice, f"/v1/jobs/{jid}"), env.get(env.bob, f"/v1/jobs/{jid}"),
               env.get(None, "/nowhere"), env.client.post("/v1/jobs", content=b"x" * (2 * 1024 * 1024),
                                                          headers=env.h(env.alice)),
               env.client.post("/v1/jobs", json={"kind": "nope"}, headers=env.h(env.alice))]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 401, 200, 404, 404, 413, 422]
    for r in answers:
        missing = [h for h in SECURITY_HEADERS if h not in r.headers]
        assert not missing, (r.request.url.path, r.status_code, missing)
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert "unsafe-eval" not in csp
    ui_csp = answers[0].headers["content-security-policy"]
    assert "script-src 'self'" in ui_csp and "unsafe-inline" not in ui_csp.split("script-src", 1)[1].split(";")[0]


def test_api_docs_load_only_pinned_scripts_with_integrity(env: Env) -> None:
    r = env.get(None, "/docs")
    assert r.status_code == 200
    html = r.text
    tags = re.findall(r"<(script|link)\b([^>]*)>", html)
    external = 0
    for tag, attrs in tags:
        src = re.search(r'(?:src|href)="([^"]+)"', attrs)
        if src is None or src.group(1).startswith("data:"):
            continue
        url = src.group(1)
        if url.startswith("/") and not url.startswith("//"):
            continue  # same origin
        external += 1
        assert re.search(r"@\d+\.\d+\.\d+/", url), f"unpinned version: {url}"
        assert re.search(r'integrity="sha(256|384|512)-[A-Za-z0-9+/=]+"', attrs), f"no integrity: {tag} {url}"
        assert 'crossorigin="anonymous"' in attrs, url
    assert external >= 2  # the Swagger UI bundle and its style sheet
    # the inline initialiser is allowed by its hash, not by 'unsafe-inline'
    script_src = r.headers["content-security-policy"].split("script-src", 1)[1].split(";")[0]
    assert "'unsafe-inline'" not in script_src and "'sha256-" in script_src, script_src
    assert env.get(None, "/redoc").status_code == 404  # ReDoc loaded an unpinned script: not served


def test_host_header_is_checked_when_auth_is_off(pg_url: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    migrate.upgrade(pg_url)
    monkeypatch.delenv("RE_AUTH", raising=False)
    monkeypatch.setenv("RE_ALLOWED_HOSTS", "lab-box.internal, 10.1.2.3")
    settings = load_settings(tmp_path, pg_url)  # as `up` loads them: auth off by default
    assert not settings.auth
    app = create_app(settings, warm=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        for host in ("localhost:8000", "127.0.0.1:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST",
                     "lab-box.internal:8000", "10.1.2.3"):
            r = client.get("/v1/jobs", headers={"Host": host})
            assert r.status_code == 200, (host, r.status_code)
        for host in ("evil.example:8000", "attacker.test", "localhost.evil.example", "127.0.0.1.nip.io", ""):
            for path in ("/v1/jobs", "/ui/", "/healthz"):
                r = client.get(path, headers={"Host": host})
                assert r.status_code == 400 and "Host" in r.json()["detail"], (host, path, r.status_code)
            r = client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers={"Host": host})
            assert r.status_code == 400
        assert client.get("/v1/jobs", headers={"Host": "localhost"}).json()["total"] == 0
    # with auth on, the token is the protection: any Host name is served
    monkeypatch.setenv("RE_AUTH", "1")
    on = create_app(load_settings(tmp_path, pg_url), warm=False)
    with TestClient(on, raise_server_exceptions=False) as client:
        assert client.get("/healthz", headers={"Host": "api.example.org"}).status_code == 200


def test_the_artifact_listing_does_not_follow_symlinks(env: Env, tmp_path: Path) -> None:
    jid = env.submit(env.alice, "train", TRAIN).json()["id"]
    art = env.settings.job_artifacts_dir(jid)
    (art / "plots").mkdir(parents=True)
    (art / "ensemble.pt").write_bytes(b"w" * 10)
    (art / "plots" / "a.png").write_bytes(b"p" * 3)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"s" * 12345)
    (outside / "deep" / "x.bin").write_bytes(b"x" * 777)
    os.symlink(outside / "secret.txt", art / "link.txt")
    os.symlink(outside, art / "linkdir")
    os.symlink(outside / "deep", art / "plots" / "deep")
    os.symlink(art / "ensemble.pt", art / "inside-link.pt")  # even one that stays inside: not listed
    items = env.get(env.alice, f"/v1/jobs/{jid}/artifacts").json()["items"]
    assert {i["name"]: i["size"] for i in items} == {"ensemble.pt": 10, "plots/a.png": 3}, items
    for name in ("link.txt", "linkdir/secret.txt", "plots/deep/x.bin"):
        assert env.get(env.alice, f"/v1/jobs/{jid}/artifacts/{name}").status_code == 404, name
