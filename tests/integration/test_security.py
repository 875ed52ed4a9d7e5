"""Authentication, tenancy and request limits of the REST API against a real PostgreSQL.

No Ray: where a job must have run, the test plays the worker's part through the real queue.
"""

from __future__ import annotations

import hashlib
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
from service.cli import main as cli_main
from service.client import Client
from service.queue import Queue
from service.settings import Settings

pytestmark = pytest.mark.integration

TRAIN = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 500}
TUNE = {"base": {"members": 2, "epochs": 1}, "num_samples": 2,
        "search_space": {"hyperparameters.label_smoothing": {"type": "choice", "values": [0.0, 0.1]}}}


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
    with TestClient(app) as client:
        yield Env(client, app.state.queue, settings, tokens, alice, bob, admin)


def _v1_paths(client: TestClient, job_id: str) -> list[tuple[str, str]]:
    """Every /v1 operation of the OpenAPI schema, with its path parameters filled in."""
    schema = client.get("/openapi.json").json()
    out = []
    for path, ops in schema["paths"].items():
        if not path.startswith("/v1"):
            continue
        concrete = path.replace("{job_id}", job_id).replace("{name}", "baseline")
        out += [(method.upper(), concrete) for method in ops]
    return out


def test_every_v1_route_needs_a_valid_token_and_health_does_not(env: Env) -> None:
    job = env.submit(env.alice, "train", TRAIN).json()
    ops = _v1_paths(env.client, job["id"])
    assert len(ops) >= 12, ops
    for method, path in ops:
        r = env.client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert "authentication required" in r.json()["detail"] and "token create" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        for bad in ({"Authorization": "Bearer re_not-a-real-token"}, {"Authorization": "Bearer "},
                    {"Authorization": f"Basic {env.alice}"}, {"Authorization": env.alice}):
            r = env.client.request(method, path, headers=bad)
            assert r.status_code == 401, (method, path, bad)
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert env.client.get(path).status_code == 200, path
    assert env.get(env.alice, "/v1/methods").status_code == 200
    assert env.get(env.alice, f"/v1/jobs/{job['id']}").json()["owner"] == "alice"


def test_tokens_are_stored_hashed_and_can_be_revoked(env: Env) -> None:
    with env.queue.engine.connect() as c:
        dump = " ".join(str(v) for row in c.execute(text("SELECT * FROM api_tokens")) for v in row)
        stored = c.execute(text("SELECT token_hash, scope FROM api_tokens WHERE owner = 'alice'")).one()
    for secret in (env.alice, env.bob, env.admin):
        assert secret not in dump and secret[3:] not in dump
    assert stored.token_hash == hashlib.sha256(env.alice.encode()).hexdigest() and stored.scope == "user"
    assert env.get(env.alice, "/v1/jobs").status_code == 200
    listed = {t["owner"]: t for t in env.tokens.list()}
    assert listed["alice"]["last_used_at"] is not None and listed["ops"]["scope"] == "admin"
    assert [r["owner"] for r in env.tokens.revoke(str(listed["alice"]["id"]))] == ["alice"]
    r = env.get(env.alice, "/v1/jobs")
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API token"
    assert env.get(env.bob, "/v1/jobs").status_code == 200
    with pytest.raises(ValueError, match="owner"):
        env.tokens.create("../evil")


def test_other_owners_get_404_for_a_job_and_everything_under_it(env: Env) -> None:
    job = env.submit(env.alice, "train", TRAIN).json()
    jid = job["id"]
    lease = env.queue.claim("w")
    assert lease is not None and str(lease.job_id) == jid
    env.queue.record_metrics(lease.job_id, 1, {"train_loss": 0.5}, lease.attempt)
    env.queue.append_logs(lease.job_id, ["epoch 1"], lease.attempt)
    art = env.settings.job_artifacts_dir(jid)
    art.mkdir(parents=True)
    (art / "ensemble.pt").write_bytes(b"alice's weights")
    assert env.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.9}})

    paths = [f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/events", f"/v1/jobs/{jid}/metrics", f"/v1/jobs/{jid}/logs",
             f"/v1/jobs/{jid}/results", f"/v1/jobs/{jid}/artifacts", f"/v1/jobs/{jid}/artifacts/ensemble.pt",
             f"/v1/jobs/{jid}/trials"]
    for path in paths:
        assert env.get(env.alice, path).status_code == 200, path
        assert env.get(env.admin, path).status_code == 200, path
        r = env.get(env.bob, path)
        assert r.status_code == 404 and r.json() == {"detail": f"no job with id {jid}"}, path
    r = env.get(env.bob, f"/v1/jobs/{jid}/logs", params={"follow": "true"})
    assert r.status_code == 404
    # a foreign job and a missing one answer alike
    missing = str(uuid.uuid4())
    assert env.get(env.bob, f"/v1/jobs/{missing}").json() == {"detail": f"no job with id {missing}"}
    for path in (f"/v1/jobs/{jid}/cancel", f"/v1/jobs/{jid}/train-best"):
        assert env.client.post(path, headers=env.h(env.bob)).status_code == 404, path
    # evaluations may not name another owner's train job (as target, surrogate or baseline)
    for field in ("target_job", "transfer_from_job", "baseline_job"):
        spec = {"target_job": jid, field: jid} if field != "target_job" else {"target_job": jid}
        if field != "target_job":
            mine = env.submit(env.bob, "train", TRAIN).json()["id"]
            spec["target_job"] = mine
        r = env.submit(env.bob, "evaluate", spec)
        assert r.status_code == 422, r.text
        assert {"field": f"spec.{field}", "msg": f"no job with id {jid}"}.items() <= r.json()["detail"][0].items()
    assert env.submit(env.alice, "evaluate", {"target_job": jid}).status_code == 201
    # listings are filtered by owner; the admin sees everyone's
    alice_ids = {j["id"] for j in env.get(env.alice, "/v1/jobs").json()["items"]}
    bob_ids = {j["id"] for j in env.get(env.bob, "/v1/jobs").json()["items"]}
    all_ids = {j["id"] for j in env.get(env.admin, "/v1/jobs").json()["items"]}
    assert jid in alice_ids and jid not in bob_ids and alice_ids | bob_ids == all_ids and not alice_ids & bob_ids
    assert env.get(env.bob, "/v1/jobs").json()["total"] == len(bob_ids) == 2
    # bob cannot cancel it; alice's job stays as it was
    assert env.get(env.alice, f"/v1/jobs/{jid}").json()["status"] == "succeeded"


def test_trials_inherit_their_tune_jobs_owner(env: Env) -> None:
    tune = env.submit(env.alice, "tune", TUNE)
    assert tune.status_code == 201, tune.text
    tid = tune.json()["id"]
    env.queue.upsert_trials(uuid.UUID(tid), [{"trial_id": "t1", "status": "RUNNING", "config": {}},
                                             {"trial_id": "t2", "status": "PENDING", "config": {}}])
    assert env.get(env.alice, f"/v1/jobs/{tid}/trials").json()["total"] == 2
    assert env.get(env.alice, "/v1/jobs", params={"kind": "trial"}).json()["total"] == 2
    assert env.get(env.bob, "/v1/jobs", params={"kind": "trial"}).json()["total"] == 0
    assert env.get(env.bob, "/v1/jobs", params={"parent_id": tid}).json()["total"] == 0
    trial = env.get(env.alice, f"/v1/jobs/{tid}/trials").json()["items"][0]
    assert trial["owner"] == "alice" and env.get(env.bob, f"/v1/jobs/{trial['id']}").status_code == 404
    # train-best: a job of the caller, never of the tune job's owner by default; server paths need an admin
    lease = env.queue.claim("w", ("tune",))
    assert lease is not None and str(lease.job_id) == tid
    assert env.queue.succeed(lease, {"best": {"train_spec": {**TRAIN, "members": 2}}})
    path = f"/v1/jobs/{tid}/train-best"
    assert env.client.post(path, headers=env.h(env.bob)).status_code == 404
    r = env.client.post(path, json={"overrides": {"data_dir": "/"}}, headers=env.h(env.alice))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "overrides.data_dir", r.text
    r = env.client.post(path, json={"overrides": {"epochs": 2}}, headers=env.h(env.alice))
    assert r.status_code == 201 and r.json()["owner"] == "alice" and r.json()["spec"]["epochs"] == 2
    assert env.get(env.bob, f"/v1/jobs/{r.json()['id']}").status_code == 404
    r = env.client.post(path, headers={**env.h(env.alice), "Idempotency-Key": "tb"})
    assert env.client.post(path, headers={**env.h(env.bob), "Idempotency-Key": "tb"}).status_code == 404
    # keys are scoped to their owner (migration 0005): the admin's "tb" is a key of its own
    admins = env.client.post(path, headers={**env.h(env.admin), "Idempotency-Key": "tb"})
    assert admins.status_code == 201 and admins.json()["id"] != r.json()["id"] and admins.json()["owner"] == "ops"


def test_idempotency_keys_do_not_cross_owners(env: Env) -> None:
    """Keys are scoped to their owner (migration 0005): another owner's use of a key neither blocks it
    nor shows (no 409 that would tell that some owner used it). More in test_probe_findings.py."""
    first = env.submit(env.alice, "train", TRAIN, **{"Idempotency-Key": "k1"})
    assert first.status_code == 201
    bobs = env.submit(env.bob, "train", {**TRAIN, "epochs": 2}, **{"Idempotency-Key": "k1"})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"], bobs.text
    replay = env.submit(env.alice, "train", TRAIN, **{"Idempotency-Key": "k1"})
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    assert env.get(env.admin, "/v1/jobs").json()["total"] == 2


def test_server_paths_in_specs_need_an_admin_token(env: Env, tmp_path: Path) -> None:
    cases = [("evaluate", {"target_checkpoint": "/etc/passwd"}, "spec.target_checkpoint"),
             ("train", {**TRAIN, "data_dir": "/"}, "spec.data_dir"),
             ("tune", {**TUNE, "base": {**TUNE["base"], "data_dir": "/"}}, "spec.base.data_dir")]
    for kind, spec, field in cases:
        r = env.submit(env.alice, kind, spec)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text
        assert "admin" in r.json()["detail"][0]["msg"]
    r = env.submit(env.admin, "evaluate", {"target_checkpoint": str(tmp_path / "x.pt")})
    assert r.status_code == 201 and r.json()["owner"] == "ops"


def test_artifacts_are_served_only_from_the_jobs_own_directory(env: Env) -> None:
    mine = env.submit(env.bob, "train", TRAIN).json()["id"]
    other = env.submit(env.alice, "train", TRAIN).json()["id"]
    root = env.settings.artifacts_root
    (root / mine).mkdir(parents=True)
    (root / mine / "ok.txt").write_text("ok")
    (root / other).mkdir(parents=True)
    (root / other / "ensemble.pt").write_bytes(b"alice's")
    (root / "secret.txt").write_text("secret")
    assert env.get(env.bob, f"/v1/jobs/{mine}/artifacts/ok.txt").content == b"ok"
    # encoded forms reach the route undecoded by the client: the route itself must refuse them
    for bad in ("..%2Fsecret.txt", "%2E%2E%2Fsecret.txt", f"%2E%2E/{other}/ensemble.pt", f"..%2F{other}%2Fensemble.pt",
                "..%5Csecret.txt", "%2Fetc%2Fpasswd", "/etc/passwd", f"{root}/secret.txt",
                f"%2F{str(root).lstrip('/')}%2Fsecret.txt", "ok.txt%00.png", "plots%2F..%2F..%2Fsecret.txt"):
        r = env.get(env.bob, f"/v1/jobs/{mine}/artifacts/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
        assert r.json()["detail"].startswith(f"job {mine} has no artifact"), (bad, r.json())
    # literal dot segments are resolved by the client (and any proxy) before routing: never a file
    for bad in ("../secret.txt", f"../{other}/ensemble.pt", "./ok.txt/../../secret.txt"):
        r = env.get(env.bob, f"/v1/jobs/{mine}/artifacts/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
        assert b"secret" not in r.content and b"alice" not in r.content


def test_request_bodies_over_the_limit_get_413(env: Env) -> None:
    big = {"kind": "train", "spec": {"data_dir": "x" * (2 * 1024 * 1024)}}
    r = env.client.post("/v1/jobs", json=big, headers=env.h(env.alice))
    assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"kind": "train", "spec": {"data_dir": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}}'

    r = env.client.post("/v1/jobs", content=chunks(), headers={**env.h(env.alice), "Content-Type": "application/json"})
    assert r.status_code == 413
    near = {"kind": "train", "spec": {"label": "z" * (1024 * 1024 - 100)}}
    r = env.client.post("/v1/jobs", json=near, headers=env.h(env.alice))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "spec.label"  # parsed, then refused
    assert env.get(env.admin, "/v1/jobs").json()["total"] == 0


@pytest.mark.parametrize(("kind", "spec", "field"), [
    ("train", {"members": 17}, "spec.members"),
    ("train", {"epochs": 10**6}, "spec.epochs"),
    ("train", {"batch_size": 10**7}, "spec.batch_size"),
    ("train", {"workers": 1000}, "spec.workers"),
    ("train", {"train_subset": 10**12}, "spec.train_subset"),
    ("train", {"schedule": {"name": "multistep", "milestones": list(range(1, 200))}, "epochs": 1000},
     "spec.schedule.milestones"),
    ("evaluate", {"target_checkpoint": "/x", "n_examples": 10**9}, "spec.n_examples"),
    ("evaluate", {"target_checkpoint": "/x", "attacks": [{"name": "pgd", "steps": 10**9}]}, "spec.attacks.0.steps"),
    ("evaluate", {"target_checkpoint": "/x", "attacks": [{"name": "pgd", "restarts": 10**4}]},
     "spec.attacks.0.restarts"),
    ("evaluate", {"target_checkpoint": "/x", "attacks": [{"name": "pgd", "eps": [1e9]}]}, "spec.attacks.0.eps.0"),
    ("tune", {**TUNE, "num_samples": 10**6}, "spec.num_samples"),
    ("tune", {**TUNE, "num_samples": 200, "search_space": {
        "hyperparameters.label_smoothing": {"type": "grid", "values": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]}}},
     "spec.num_samples"),
])
def test_unbounded_work_is_refused_with_422_naming_the_field(env: Env, kind: str, spec: dict[str, Any],
                                                             field: str) -> None:
    r = env.submit(env.admin, kind, spec)
    assert r.status_code == 422, r.text
    assert field in [d["field"] for d in r.json()["detail"]], r.json()


def test_cli_token_commands_and_the_client_send_the_token(env: Env, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url = env.settings.database_url
    assert url is not None
    assert cli_main(["token", "create", "--owner", "carol", "--database-url", url, "--name", "laptop"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("re_") and len(token) > 40
    assert cli_main(["token", "list", "--database-url", url]) == 0
    listing = capsys.readouterr().out
    assert "carol" in listing and "laptop" in listing and token not in listing and token[:10] in listing
    assert cli_main(["token", "create", "--owner", "no spaces", "--database-url", url]) == 2

    monkeypatch.setenv("RE_API_TOKEN", token)
    c = Client("http://testserver")
    env.client.headers.update(c.http.headers)  # the client's headers on the in-process transport
    c.http.close()
    c.http = env.client
    job = c.submit("train", TRAIN)
    assert job["owner"] == "carol" and c.job(job["id"])["id"] == job["id"]
    assert [j["id"] for j in c.jobs()["items"]] == [job["id"]]

    assert cli_main(["token", "revoke", token[:12], "--database-url", url]) == 0
    assert "revoked" in capsys.readouterr().out
    from service.client import ApiError

    with pytest.raises(ApiError, match="401"):
        c.job(job["id"])
