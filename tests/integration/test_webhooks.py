"""Webhooks (issue #24) against a real PostgreSQL and real HTTP receivers on 127.0.0.1.

Events are queued by the database triggers as the test plays the worker's part through the real queue; the
real :class:`service.webhooks.Dispatcher` sends them. The receiver on 127.0.0.1 is reached only with
``webhook_allow_private`` on; with it off the same targets are refused. The worker's housekeeping thread
(service.housekeeping), which runs the same Dispatcher beside a real job, has no end-to-end test yet (issue #24).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from webhook_receiver import Receiver

from service import migrate, webhooks
from service.app import create_app
from service.auth import TokenStore
from service.queue import Queue
from service.settings import Settings
from service.webhooks import Dispatcher, address_problem, verify

pytestmark = pytest.mark.integration

TRAIN = {"method": "baseline", "members": 2, "epochs": 2, "train_subset": 500}


@dataclass
class Env:
    client: TestClient
    queue: Queue
    settings: Settings
    alice: str
    bob: str

    def h(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def hook(self, token: str, url: str, events: list[str], **body: Any) -> Any:
        return self.client.post("/v1/webhooks", json={"url": url, "events": events, **body}, headers=self.h(token))

    def deliveries(self, token: str, hook_id: str, **params: Any) -> list[dict[str, Any]]:
        r = self.client.get(f"/v1/webhooks/{hook_id}/deliveries", headers=self.h(token), params=params)
        assert r.status_code == 200, r.text
        return list(reversed(r.json()["items"]))  # oldest first


def make_env(pg_url: str, tmp_path: Path, allow_private: bool) -> Iterator[Env]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, webhook_allow_private=allow_private,
                        webhook_backoff_seconds=0.2, webhook_backoff_max_seconds=1.0, webhook_max_attempts=4,
                        webhook_timeout_seconds=5.0)
    app = create_app(settings, warm=False)
    tokens = TokenStore(app.state.queue.engine)
    alice, _ = tokens.create("alice")
    bob, _ = tokens.create("bob")
    with TestClient(app) as client:
        yield Env(client, app.state.queue, settings, alice, bob)


@pytest.fixture()
def env(pg_url: str, tmp_path: Path) -> Iterator[Env]:
    yield from make_env(pg_url, tmp_path, allow_private=True)


@pytest.fixture()
def strict(pg_url: str, tmp_path: Path) -> Iterator[Env]:
    yield from make_env(pg_url, tmp_path, allow_private=False)


def drain(env: Env, until: Callable[[], bool], timeout: float = 30.0) -> None:
    """Run the dispatcher until ``until()`` holds."""
    dispatcher = Dispatcher(env.queue.engine, env.settings)
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "deliveries did not arrive in time"
        if dispatcher.run_once() == 0:
            time.sleep(0.05)


def play_job(env: Env, token: str, metrics: list[float]) -> str:
    """Submit a train job and play its run: claim, one train_loss point per epoch, succeed."""
    jid = env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN, "tags": ["hooked"]},
                          headers=env.h(token)).json()["id"]
    lease = env.queue.claim("w")
    assert lease is not None and str(lease.job_id) == jid
    for step, value in enumerate(metrics, start=1):
        env.queue.record_metrics(lease.job_id, step, {"train_loss": value, "lr": 0.001}, lease.attempt)
    assert env.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.97}})
    return jid


def test_signed_events_reach_a_receiver_that_fails_then_recovers(env: Env) -> None:
    # the receiver answers 500 to its first two requests, then 200
    with Receiver(answer=lambda n: (500, {}) if n < 2 else (200, {})) as rx:
        r = env.hook(env.alice, rx.url + "/hook?src=re", ["job.created", "job.started", "job.succeeded",
                                                           "metric.threshold"],
                     thresholds=[{"metric": "train_loss", "op": "<=", "value": 0.5},
                                 {"metric": "train_loss", "op": "<", "value": 0.0}], description="ci")
        assert r.status_code == 201, r.text
        hook = r.json()
        secret = hook["secret"]
        assert secret.startswith("whsec_") and len(secret) > 40
        listed = env.client.get("/v1/webhooks", headers=env.h(env.alice)).json()["items"]
        assert [w["id"] for w in listed] == [hook["id"]] and "secret" not in listed[0]
        assert "secret" not in env.client.get(f"/v1/webhooks/{hook['id']}", headers=env.h(env.alice)).json()
        with env.queue.engine.connect() as c:  # stored for signing, never shown again
            assert c.execute(text("SELECT secret FROM webhooks")).scalar() == secret

        jid = play_job(env, env.alice, [0.9, 0.4, 0.3])  # crosses train_loss <= 0.5 at epoch 2, only once
        play_job(env, env.bob, [0.1])  # bob's job: nothing for alice's subscription
        assert len(env.deliveries(env.alice, hook["id"])) == 4
        assert rx.requests == []  # nothing is sent from the request path or the queue

        drain(env, lambda: all(d["status"] == "delivered" for d in env.deliveries(env.alice, hook["id"])))
        # every request is signed: HMAC-SHA256 of "<timestamp>.<body>" under the secret
        for req in rx.requests:
            hd = {k.lower(): v for k, v in req["headers"].items()}
            assert req["path"] == "/hook?src=re" and hd["content-type"] == "application/json"
            assert verify(secret, hd["x-re-timestamp"], req["body"], hd["x-re-signature"])
            assert not verify(secret, hd["x-re-timestamp"], req["body"] + b" ", hd["x-re-signature"])
            assert not verify("whsec_other", hd["x-re-timestamp"], req["body"], hd["x-re-signature"])
            assert req["json"]["event"] == hd["x-re-event"] and str(req["json"]["delivery"]) == hd["x-re-delivery"]
        ok = [r["json"] for r in rx.requests[2:]]  # after the two failed requests
        assert sorted(p["event"] for p in ok) == sorted(["job.created", "job.started", "metric.threshold",
                                                          "job.succeeded"])
        assert all(p["job"]["id"] == jid and p["job"]["owner"] == "alice" for p in ok)
        by_event = {p["event"]: p for p in ok}
        assert by_event["job.succeeded"]["transition"]["from"] == "running"
        assert by_event["job.succeeded"]["job"]["tags"] == ["hooked"]
        crossed = by_event["metric.threshold"]
        assert crossed["metric"] == {"name": "train_loss", "step": 2, "value": 0.4, "attempt": 1}
        assert crossed["threshold"] == {"metric": "train_loss", "op": "<=", "value": 0.5}
        # the delivery log: the two requests answered 500 were retried and delivered, every attempt kept
        log = env.deliveries(env.alice, hook["id"])
        assert len(rx.requests) == sum(d["attempts"] for d in log) == 6
        retried = [d for d in log if d["attempts"] > 1]
        assert len(retried) == 2 and all(d["last_status_code"] == 200 and d["delivered_at"] for d in log)
        for d in retried:
            assert [a["status_code"] for a in d["history"]] == [500, 200] and "HTTP 500" in d["history"][0]["error"]
        assert env.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=env.h(env.alice),
                              params={"event": "metric.threshold"}).json()["total"] == 1


def test_a_receiver_that_is_down_gets_the_event_once_it_is_up_and_a_paused_hook_gets_no_new_events(env: Env) -> None:
    with socket.socket() as s:  # a port with nobody listening (yet)
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    hook = env.hook(env.alice, f"http://127.0.0.1:{port}/", ["job.*"]).json()
    jid = env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers=env.h(env.alice)).json()["id"]
    dispatcher = Dispatcher(env.queue.engine, env.settings)
    assert dispatcher.run_once() == 1
    (d,) = env.deliveries(env.alice, hook["id"])
    assert d["status"] == "pending" and d["attempts"] == 1 and "refused" in d["last_error"].lower()
    with Receiver(port=port) as rx:
        drain(env, lambda: len(rx.requests) == 1)
        assert rx.requests[0]["json"]["event"] == "job.created" and rx.requests[0]["json"]["job"]["id"] == jid
        (d,) = env.deliveries(env.alice, hook["id"])
        assert d["status"] == "delivered" and d["attempts"] == 2
        # paused: what was queued before (the ping) waits, and no event of the pause is queued (the migration's
        # triggers serve active subscriptions only, as a paused GitHub hook); resumed: the ping is sent
        r = env.client.patch(f"/v1/webhooks/{hook['id']}", json={"active": False}, headers=env.h(env.alice))
        assert r.status_code == 200 and r.json()["active"] is False
        ping = env.client.post(f"/v1/webhooks/{hook['id']}/ping", headers=env.h(env.alice))
        assert ping.status_code == 202 and ping.json()["event"] == "ping"
        env.queue.cancel(uuid.UUID(jid))
        for _ in range(3):
            dispatcher.run_once()
        assert len(rx.requests) == 1
        env.client.patch(f"/v1/webhooks/{hook['id']}", json={"active": True}, headers=env.h(env.alice))
        assert [d["event"] for d in env.deliveries(env.alice, hook["id"])] == ["job.created", "ping"]
        drain(env, lambda: len(rx.requests) == 2)
        assert rx.requests[1]["json"]["event"] == "ping"
        jid2 = env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers=env.h(env.alice)).json()
        drain(env, lambda: len(rx.requests) == 3)
        assert rx.requests[2]["json"]["event"] == "job.created" and rx.requests[2]["json"]["job"]["id"] == jid2["id"]


def test_a_receiver_that_never_recovers_fails_after_the_last_attempt_and_redirects_are_not_followed(env: Env) -> None:
    with Receiver(answer=lambda n: (302, {"Location": "/elsewhere"})) as rx:
        hook = env.hook(env.alice, rx.url + "/moved", ["job.created"]).json()
        env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers=env.h(env.alice))
        drain(env, lambda: env.deliveries(env.alice, hook["id"])[0]["status"] == "failed")
        (d,) = env.deliveries(env.alice, hook["id"])
        assert d["attempts"] == env.settings.webhook_max_attempts == 4
        assert d["last_status_code"] == 302 and "redirects are not followed" in d["last_error"]
        assert [r["path"] for r in rx.requests] == ["/moved"] * 4  # /elsewhere never requested


def test_webhook_fields_are_validated_with_422_naming_the_field(env: Env) -> None:
    good = {"url": "http://127.0.0.1:9/x", "events": ["job.succeeded"]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "ftp://example.com/x"}, "url"), ({"url": "javascript:alert(1)"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url"), ({"url": "http://tok@127.0.0.1/x"}, "url"),
        ({"url": "http:///nohost"}, "url"), ({"url": "http://127.0.0.1:99999/"}, "url"),
        ({"url": "http://127.0.0.1/a b"}, "url"), ({"url": "http://127.0.0.1/#frag"}, "url"),
        ({"url": "http://x/" + "a" * 2001}, "url"), ({"url": 5}, "url"),
        ({"url": "http://no-such-host.invalid/"}, "url"),
        ({"events": []}, "events"), ({"events": ["job.exploded"]}, "events.0"), ({"events": "job.*"}, "events"),
        ({"events": ["metric.threshold"]}, "thresholds"),
        ({"thresholds": [{"metric": "acc", "op": ">=", "value": 1}]}, "events"),
        ({"events": ["metric.threshold"], "thresholds": [{"metric": "acc", "op": "=>", "value": 1}]},
         "thresholds.0.op"),
        ({"events": ["metric.threshold"], "thresholds": [{"metric": "a b", "op": ">", "value": 1}]},
         "thresholds.0.metric"),
        ({"events": ["metric.threshold"], "thresholds": [{"metric": "acc", "op": ">", "value": "nan"}]},
         "thresholds.0.value"),
        ({"events": ["metric.threshold"], "thresholds": [{"metric": "acc", "op": ">", "value": 1, "x": 2}]},
         "thresholds.0.x"),
        ({"events": ["metric.threshold"], "thresholds": [{"metric": "a", "op": ">", "value": 1}] * 17},
         "thresholds"),
        ({"description": "d" * 501}, "description"), ({"description": "a\x00b"}, "description"),
        ({"secret": "mine"}, "secret"),
    ]
    for change, field in cases:
        r = env.client.post("/v1/webhooks", json={**good, **change}, headers=env.h(env.alice))
        assert r.status_code == 422, (change, r.text)
        assert r.json()["detail"][0]["field"] == field, (change, r.text)
    assert env.client.get("/v1/webhooks", headers=env.h(env.alice)).json()["items"] == []
    hook = env.client.post("/v1/webhooks", json=good, headers=env.h(env.alice)).json()
    for change, field in [({"url": "gopher://x/"}, "url"), ({"events": ["nope"]}, "events.0"),
                          ({"active": "maybe"}, "active"), ({"events": None}, "events"),
                          ({"thresholds": [{"metric": "a", "op": ">", "value": 1}]}, "events")]:
        r = env.client.patch(f"/v1/webhooks/{hook['id']}", json=change, headers=env.h(env.alice))
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, (change, r.text)
    r = env.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=env.h(env.alice), params={"status": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "query.status"


def test_another_owner_gets_404_for_a_webhook_and_everything_under_it(env: Env) -> None:
    hook = env.hook(env.alice, "http://127.0.0.1:9/", ["job.*"]).json()
    wid = hook["id"]
    for method, path, body in [("GET", f"/v1/webhooks/{wid}", None), ("PATCH", f"/v1/webhooks/{wid}", {}),
                               ("DELETE", f"/v1/webhooks/{wid}", None),
                               ("GET", f"/v1/webhooks/{wid}/deliveries", None),
                               ("POST", f"/v1/webhooks/{wid}/ping", None),
                               ("POST", f"/v1/webhooks/{wid}/rotate-secret", None)]:
        r = env.client.request(method, path, json=body, headers=env.h(env.bob))
        assert r.status_code == 404 and r.json() == {"detail": f"no webhook with id {wid}"}, (method, path)
    assert env.client.get("/v1/webhooks", headers=env.h(env.bob)).json()["items"] == []
    rotated = env.client.post(f"/v1/webhooks/{wid}/rotate-secret", headers=env.h(env.alice)).json()
    assert rotated["secret"] != hook["secret"] and rotated["secret"].startswith("whsec_")
    assert env.client.delete(f"/v1/webhooks/{wid}", headers=env.h(env.alice)).status_code == 200
    assert env.client.get(f"/v1/webhooks/{wid}", headers=env.h(env.alice)).status_code == 404


def test_private_and_loopback_targets_are_refused_with_the_setting_off(strict: Env, tmp_path: Path) -> None:
    env = strict
    with Receiver() as rx:
        for url in (rx.url + "/", f"http://localhost:{rx.port}/", f"http://[::1]:{rx.port}/",
                    "http://10.0.0.7/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
                    "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/", "http://2130706433/"):
            r = env.hook(env.alice, url, ["job.*"])
            assert r.status_code == 422, (url, r.text)
            assert r.json()["detail"][0]["field"] == "url", (url, r.text)
        # a subscription stored while the setting was on (or whose DNS changed since): refused at delivery
        with env.queue.engine.begin() as c:
            c.execute(text("INSERT INTO webhooks (id, owner, url, events, secret) VALUES (:id, 'alice', :url, "
                           "'{job.*}', 'whsec_x')"), {"id": uuid.uuid4(), "url": rx.url + "/"})
        env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers=env.h(env.alice))
        Dispatcher(env.queue.engine, env.settings).run_once()
        with env.queue.engine.connect() as c:
            d = c.execute(text("SELECT status, attempts, last_error, last_status_code FROM webhook_deliveries")).one()
        assert d.attempts == 1 and d.last_status_code is None and d.status == "pending"
        assert d.last_error.startswith("refused:") and "RE_WEBHOOK_ALLOW_PRIVATE" in d.last_error
        assert rx.requests == []


def test_dns_rebinding_is_refused_at_delivery(strict: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host resolved to a public address when subscribed and to 127.0.0.1 when delivered: refused, and the
    connection never made (the checked address is the one connected to)."""
    env = strict
    answers = {"now": "93.184.215.14"}

    def fake_resolve(host: str, port: int, **kw: Any) -> list[Any]:
        if host != "rebind.example":
            return socket.getaddrinfo(host, port, **kw)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers["now"], port))]

    monkeypatch.setattr(webhooks, "resolve", fake_resolve)
    with Receiver() as rx:
        r = env.hook(env.alice, f"http://rebind.example:{rx.port}/", ["job.created"])
        assert r.status_code == 201, r.text
        answers["now"] = "127.0.0.1"  # the attacker's DNS now points at the service's own machine
        env.client.post("/v1/jobs", json={"kind": "train", "spec": TRAIN}, headers=env.h(env.alice))
        assert Dispatcher(env.queue.engine, env.settings).run_once() == 1
        (d,) = env.deliveries(env.alice, r.json()["id"])
        assert d["status"] == "pending" and "127.0.0.1 is a loopback address" in d["last_error"]
        assert rx.requests == []


@pytest.mark.parametrize(("ip", "private_ok", "always_refused"), [
    ("93.184.215.14", True, False), ("2606:4700::1111", True, False),
    ("127.0.0.1", False, False), ("::1", False, False), ("10.1.2.3", False, False), ("172.16.0.1", False, False),
    ("192.168.0.10", False, False), ("100.64.0.1", False, False), ("fd12::1", False, False),
    ("::ffff:10.0.0.1", False, False), ("::ffff:127.0.0.1", False, False), ("198.51.100.7", False, False),
    ("169.254.169.254", False, True), ("fe80::1", False, True), ("fd00:ec2::254", False, True),
    ("::ffff:169.254.169.254", False, True), ("0.0.0.0", False, True), ("::", False, True),
    ("224.0.0.1", False, True), ("ff02::1", False, True),
])
def test_the_address_policy(ip: str, private_ok: bool, always_refused: bool) -> None:
    assert (address_problem(ip, allow_private=False) is None) == private_ok, ip
    assert (address_problem(ip, allow_private=True) is None) == (not always_refused), ip
