"""Organisation and clean-up of jobs (issue #24) against a real PostgreSQL: tags and notes, filters and search,
``DELETE /v1/jobs/{id}`` with its files and dependents, retention per owner, orphaned folders, disk usage.

No Ray: where a job must have run, the test plays the worker's part through the real queue (as
test_security.py does); the Ray side of deletion (a real run's checkpoints) is in test_platform_ray.py.
"""

from __future__ import annotations

import os
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
from service.cleanup import apply_retention, delete_job, sweep_orphans
from service.cli import main as cli_main
from service.policies import PolicyStore
from service.queue import Queue
from service.settings import Settings

pytestmark = pytest.mark.integration

TRAIN = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 500}


@dataclass
class Env:
    client: TestClient
    queue: Queue
    settings: Settings
    alice: str
    bob: str
    admin: str

    def h(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def submit(self, token: str, kind: str = "train", spec: dict[str, Any] | None = None, **body: Any) -> Any:
        return self.client.post("/v1/jobs", json={"kind": kind, "spec": spec or TRAIN, **body}, headers=self.h(token))

    def get(self, token: str, path: str, **params: Any) -> Any:
        return self.client.get(path, headers=self.h(token), params=params)

    def run_to_end(self, job_id: str, files: bool = True) -> None:
        """Play the worker: claim the job (it must be the next train job), write files, succeed."""
        lease = self.queue.claim("w", ("train",))
        assert lease is not None and str(lease.job_id) == job_id
        if files:
            art = self.settings.job_artifacts_dir(job_id)
            art.mkdir(parents=True, exist_ok=True)
            (art / "ensemble.pt").write_bytes(b"x" * 1000)
            ckpt = self.settings.ray_storage_path / job_id / "checkpoint_000000"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "state.pt").write_bytes(b"y" * 500)
        assert self.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.9}})


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
        yield Env(client, app.state.queue, settings, alice, bob, admin)


def _ids(r: Any) -> list[str]:
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["items"]]


def _field(r: Any) -> list[str]:
    assert r.status_code == 422, (r.status_code, r.text)
    return [e["field"] for e in r.json()["detail"]]


# ------------------------------------------------------------------------------------------ tags, notes, filters
def test_tags_and_notes_are_set_at_submission_edited_and_validated(env: Env) -> None:
    r = env.submit(env.alice, tags=["paper:t3", "seed-0", "paper:t3"], note="first try")
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["tags"] == ["paper:t3", "seed-0"] and job["note"] == "first try"
    jid = job["id"]
    path = f"/v1/jobs/{jid}"
    r = env.client.patch(path, json={"add_tags": ["keep", "seed-0"], "remove_tags": ["paper:t3"]},
                         headers=env.h(env.alice))
    assert r.status_code == 200 and r.json()["tags"] == ["seed-0", "keep"] and r.json()["note"] == "first try"
    r = env.client.patch(path, json={"note": None}, headers=env.h(env.alice))
    assert r.json()["note"] is None and r.json()["tags"] == ["seed-0", "keep"]
    r = env.client.patch(path, json={"tags": [], "note": "é ✓ multi\nline"}, headers=env.h(env.alice))
    assert r.json()["tags"] == [] and r.json()["note"] == "é ✓ multi\nline"
    assert env.get(env.alice, path).json()["note"] == "é ✓ multi\nline"
    # bad input: 422 naming the field, nothing changed
    bad_patches = [
        ({"tags": ["has space"]}, "tags"), ({"add_tags": ["../x"]}, "add_tags"),
        ({"remove_tags": [""]}, "remove_tags"), ({"tags": ["x" * 41]}, "tags"),
        ({"tags": [f"t{i}" for i in range(17)]}, "tags"), ({"note": "x" * 4001}, "note"),
        ({"note": "a\x00b"}, "note"), ({"note": 5}, "note"), ({"tags": "a"}, "tags"), ({"colour": "red"}, "colour"),
    ]
    for body, field in bad_patches:
        r = env.client.patch(path, json=body, headers=env.h(env.alice))
        assert _field(r)[0] == field, (body, r.text)
    ok = env.client.patch(path, json={"add_tags": [f"a{i}" for i in range(16)]}, headers=env.h(env.alice))
    assert ok.status_code == 200 and len(ok.json()["tags"]) == 16
    r = env.client.patch(path, json={"add_tags": ["one-more"]}, headers=env.h(env.alice))
    assert _field(r) == ["tags"] and "at most 16" in r.json()["detail"][0]["msg"]
    assert len(env.get(env.alice, path).json()["tags"]) == 16
    for body, field in [({"tags": ["ok", "no/slash"]}, "tags"), ({"note": "x" * 4001}, "note"),
                        ({"tags": "not-a-list"}, "tags")]:
        r = env.submit(env.alice, **body)
        assert _field(r)[0] == field, (body, r.text)
    # other owners: 404, as for a missing job; the admin may edit
    r = env.client.patch(path, json={"note": "bob was here"}, headers=env.h(env.bob))
    assert r.status_code == 404 and r.json() == {"detail": f"no job with id {jid}"}
    assert env.client.patch(path, json={"note": "ops"}, headers=env.h(env.admin)).json()["note"] == "ops"
    missing = uuid.uuid4()
    assert env.client.patch(f"/v1/jobs/{missing}", json={}, headers=env.h(env.alice)).status_code == 404


def test_jobs_are_filtered_by_method_dataset_kind_status_tag_text_and_date(env: Env) -> None:
    a1 = env.submit(env.alice, spec={**TRAIN, "method": "pdd"}, tags=["sweep", "lr-small"], note="Needle in notes")
    a2 = env.submit(env.alice, spec={**TRAIN, "dataset": "fashion_mnist"}, tags=["sweep"])
    a3 = env.submit(env.alice, "tune", {"base": {**TRAIN, "method": "pdd"}, "num_samples": 2,
                                        "search_space": {"lr": {"type": "choice", "values": [0.001, 0.01]}}})
    b1 = env.submit(env.bob, spec={**TRAIN, "method": "pdd"}, tags=["sweep"], note="needle of bob")
    ids = {k: r.json()["id"] for k, r in {"a1": a1, "a2": a2, "a3": a3, "b1": b1}.items()}
    assert all(r.status_code == 201 for r in (a1, a2, a3, b1))
    ev = env.submit(env.alice, "evaluate", {"target_job": ids["a1"]})
    assert ev.status_code == 201
    ids["ev"] = ev.json()["id"]
    lease = env.queue.claim("w", ("train",))  # a1 runs
    assert lease is not None and str(lease.job_id) == ids["a1"]

    def q(**params: Any) -> set[str]:
        return set(_ids(env.get(env.alice, "/v1/jobs", **params)))

    assert q(method="pdd") == {ids["a1"], ids["a3"]}  # a tune job by its base spec's method
    assert q(method="pdd,baseline", kind="train") == {ids["a1"], ids["a2"]}
    assert q(dataset="fashion_mnist") == {ids["a2"]}
    assert q(tag="sweep") == {ids["a1"], ids["a2"]}
    assert q(tag=["sweep", "lr-small"]) == {ids["a1"]}  # every tag
    assert q(status="running") == {ids["a1"]}
    assert q(kind="evaluate") == {ids["ev"]}
    assert q(q="NEEDLE") == {ids["a1"]}  # case-insensitive, bob's note never shows
    assert q(q=ids["a2"][:8]) == {ids["a2"]}
    assert q(q="100%_") == set()  # LIKE wildcards are literals
    assert q(q="fashion") == {ids["a2"]}  # the spec's text
    now = env.get(env.alice, f"/v1/jobs/{ids['a3']}").json()["created_at"]
    assert ids["a3"] in q(since=now) and ids["a1"] not in q(since=now)
    assert q(until="2000-01-01") == set() and len(q(since="2000-01-01")) == 4
    assert q(since="2000-01-01T00:00:00+02:00", until="2999-01-01", method="pdd", tag="sweep") == {ids["a1"]}
    page = env.get(env.alice, "/v1/jobs", tag="sweep", limit=1).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    assert set(_ids(env.get(env.bob, "/v1/jobs", q="needle"))) == {ids["b1"]}
    assert len(_ids(env.get(env.admin, "/v1/jobs", tag="sweep"))) == 3
    # bad filters: 422 naming the query parameter
    for params, field in [({"since": "yesterday"}, "query.since"), ({"until": "2026-13-01"}, "query.until"),
                          ({"tag": "a b"}, "query.tag"), ({"method": "x;drop"}, "query.method"),
                          ({"dataset": "../etc"}, "query.dataset"), ({"q": "x" * 201}, "query.q"),
                          ({"since": "2026-02-01", "until": "2026-01-01"}, "query.until"),
                          ({"status": "sleeping"}, "query.status")]:
        r = env.get(env.alice, "/v1/jobs", **params)
        assert _field(r) == [field], (params, r.text)
    # the CLI's status command filters the same way
    env.queue.succeed(lease, {"metrics": {}})


def test_the_cli_filters_and_edits_jobs(env: Env, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from service import client as client_mod

    def through_app(base_url: str | None = None, timeout: float = 30.0,
                    headers: dict[str, str] | None = None) -> TestClient:  # the CLI's HTTP client on the test app
        return TestClient(env.client.app, headers=headers)

    monkeypatch.setattr(client_mod.httpx, "Client", through_app)
    try:
        one = env.submit(env.alice, spec={**TRAIN, "method": "pdd"}, tags=["cli"]).json()["id"]
        two = env.submit(env.alice).json()["id"]
        assert cli_main(["status", "--token", env.alice, "--tag", "cli", "--method", "pdd", "--since", "2000-01-01",
                         "--json"]) == 0
        out = capsys.readouterr().out
        assert one in out and two not in out
        assert cli_main(["edit", one, "--token", env.alice, "--tag", "best", "--untag", "cli", "--note",
                         "the good one"]) == 0
        job = env.get(env.alice, f"/v1/jobs/{one}").json()
        assert job["tags"] == ["best"] and job["note"] == "the good one"
        capsys.readouterr()
        assert cli_main(["status", "--token", env.alice, "--search", "GOOD ONE"]) == 0
        out = capsys.readouterr().out
        assert one in out and two not in out and "[best]" in out
        assert cli_main(["status", "--token", env.alice, "--tag", "bad tag"]) == 1
        assert "query.tag" in capsys.readouterr().err
        assert cli_main(["submit", "train", "--token", env.alice, "--set", "epochs=1", "--tag", "from-cli",
                         "--note", "n"]) == 0
        new = capsys.readouterr().out.strip()
        assert env.get(env.alice, f"/v1/jobs/{new}").json()["tags"] == ["from-cli"]
        assert cli_main(["delete", two, "--token", env.alice]) == 0
        assert env.get(env.alice, f"/v1/jobs/{two}").status_code == 404
        assert cli_main(["usage", "--token", env.alice]) == 0
        assert "jobs" in capsys.readouterr().out
    finally:
        monkeypatch.undo()


# ------------------------------------------------------------------------------------------ deletion
def test_delete_removes_rows_and_files_refuses_running_jobs_and_handles_dependents(env: Env) -> None:
    train = env.submit(env.alice).json()["id"]
    ev_done = env.submit(env.alice, "evaluate", {"target_job": train}).json()["id"]
    ev_queued = env.submit(env.alice, "evaluate", {"target_job": train, "n_examples": 10}).json()["id"]
    env.run_to_end(train)
    lease = env.queue.claim("w", ("evaluate",))
    assert lease is not None and str(lease.job_id) == ev_done
    # running: 409 for the job itself and for the job it depends on
    r = env.client.delete(f"/v1/jobs/{ev_done}", headers=env.h(env.alice))
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    r = env.client.delete(f"/v1/jobs/{train}", headers=env.h(env.alice))
    assert r.status_code == 409 and ev_done in r.json()["detail"]
    assert env.queue.succeed(lease, {"tables": []})
    # another owner: 404, nothing deleted
    assert env.client.delete(f"/v1/jobs/{train}", headers=env.h(env.bob)).status_code == 404
    art, ckpt = env.settings.job_artifacts_dir(train), env.settings.ray_storage_path / train
    assert (art / "ensemble.pt").is_file() and ckpt.is_dir()
    r = env.client.delete(f"/v1/jobs/{train}", headers=env.h(env.alice))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deleted"] == [train] and body["freed_bytes"] == 1500 and body["files_left"] == []
    assert body["dependents_cancelled"] == [ev_queued] and body["dependents_kept"] == [ev_done]
    assert not art.exists() and not ckpt.exists()
    assert env.get(env.alice, f"/v1/jobs/{train}").status_code == 404
    with env.queue.engine.connect() as c:
        for table in ("job_events", "job_metrics", "job_logs"):
            assert c.execute(text(f"SELECT count(*) FROM {table} WHERE job_id = :id"), {"id": train}).scalar() == 0
    queued = env.get(env.alice, f"/v1/jobs/{ev_queued}").json()
    assert queued["status"] == "cancelled" and f"its dependency {train} was deleted" in queued["error"]
    assert env.get(env.alice, f"/v1/jobs/{ev_done}").json()["status"] == "succeeded"
    assert env.client.delete(f"/v1/jobs/{train}", headers=env.h(env.alice)).status_code == 404


def test_delete_with_cascade_and_a_tune_job_with_its_trials(env: Env) -> None:
    train = env.submit(env.alice).json()["id"]
    ev = env.submit(env.alice, "evaluate", {"target_job": train}).json()["id"]
    env.run_to_end(train)
    r = env.client.delete(f"/v1/jobs/{train}", headers=env.h(env.alice), params={"cascade": "true"})
    assert r.status_code == 200 and r.json()["deleted"] == [train, ev], r.text
    assert env.get(env.alice, f"/v1/jobs/{ev}").status_code == 404
    tune = env.submit(env.alice, "tune", {"base": TRAIN, "num_samples": 2,
                                          "search_space": {"lr": {"type": "choice", "values": [0.1, 0.2]}}}).json()
    env.queue.upsert_trials(uuid.UUID(tune["id"]), [{"trial_id": "a", "status": "RUNNING"},
                                                    {"trial_id": "b", "status": "TERMINATED"}])
    trial = env.get(env.alice, f"/v1/jobs/{tune['id']}/trials").json()["items"][0]["id"]
    r = env.client.delete(f"/v1/jobs/{trial}", headers=env.h(env.alice))
    assert r.status_code == 409 and "delete the tune job" in r.json()["detail"]
    r = env.client.delete(f"/v1/jobs/{tune['id']}", headers=env.h(env.alice))  # queued: deletable
    assert r.status_code == 200 and r.json()["trials"] == 2
    assert env.get(env.alice, "/v1/jobs", kind="trial").json()["total"] == 0
    other = env.submit(env.alice).json()["id"]
    assert _field(env.client.delete(f"/v1/jobs/{other}", headers=env.h(env.alice),
                                    params={"cascade": "perhaps"})) == ["query.cascade"]


def test_a_queued_job_being_deleted_cannot_be_claimed(env: Env) -> None:
    """The row is locked while it is checked and deleted: a claim meanwhile skips it and never runs it."""
    import threading

    jid = env.submit(env.alice).json()["id"]
    engine = env.queue.engine
    got: list[Any] = []
    with engine.begin() as c:
        c.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"), {"id": jid})  # as delete_job holds it
        t = threading.Thread(target=lambda: got.append(env.queue.claim("w")))
        t.start()
        t.join(10)
        assert not t.is_alive() and got == [None]
    assert delete_job(engine, env.settings, uuid.UUID(jid)).deleted == [jid]


def test_a_crash_between_the_rows_and_the_files_leaves_folders_that_the_sweep_removes(env: Env) -> None:
    keep = env.submit(env.alice).json()["id"]
    gone = env.submit(env.alice).json()["id"]
    env.run_to_end(keep)
    env.run_to_end(gone)
    # the rows of `gone` deleted, the process "died" before removing its files
    with env.queue.engine.begin() as c:
        c.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": gone})
    stray = env.settings.artifacts_root / "not-a-job-id"
    stray.mkdir()
    fresh = env.settings.artifacts_root / str(uuid.uuid4())  # no job, but new: within the grace period
    fresh.mkdir()
    assert sweep_orphans(env.queue.engine, env.settings, grace_seconds=3600) == []
    old = time.time() - 7200
    for p in (env.settings.job_artifacts_dir(gone), env.settings.ray_storage_path / gone):
        os.utime(p, (old, old))
    listed = sweep_orphans(env.queue.engine, env.settings, grace_seconds=3600, dry_run=True)
    assert env.settings.job_artifacts_dir(gone).exists() and len(listed) == 2
    removed = sweep_orphans(env.queue.engine, env.settings, grace_seconds=3600)
    assert sorted(removed) == sorted([str(env.settings.job_artifacts_dir(gone)),
                                      str(env.settings.ray_storage_path / gone)])
    assert not env.settings.job_artifacts_dir(gone).exists() and stray.is_dir() and fresh.is_dir()
    assert (env.settings.job_artifacts_dir(keep) / "ensemble.pt").is_file()


# ------------------------------------------------------------------------------------------ retention and usage
def test_retention_rules_keep_the_newest_and_recent_jobs_tagged_keep_and_needed_ones(env: Env) -> None:
    ids = []
    for i in range(5):
        jid = env.submit(env.alice, tags=["keep"] if i == 0 else []).json()["id"]
        env.run_to_end(jid)
        ids.append(jid)
    needed = ids[1]
    waiting = env.submit(env.alice, "evaluate", {"target_job": needed}).json()["id"]  # queued: needs ids[1]
    bobs = env.submit(env.bob).json()["id"]
    env.run_to_end(bobs)
    with env.queue.engine.begin() as c:  # ids[2] finished 40 days ago
        c.execute(text("UPDATE jobs SET finished_at = now() - interval '40 days' WHERE id = :id"), {"id": ids[2]})
    r = env.client.put("/v1/retention", json={"keep_days": 30}, headers=env.h(env.alice))
    assert r.status_code == 200 and r.json()["effective"] == {"keep_days": 30, "keep_last": None}
    r = env.client.post("/v1/retention/apply", headers=env.h(env.alice))  # a dry run by default
    assert r.json()["owners"][0]["selected"] == [ids[2]] and r.json()["owners"][0]["deleted"] == []
    assert env.get(env.alice, f"/v1/jobs/{ids[2]}").status_code == 200
    r = env.client.put("/v1/retention", json={"keep_last": 1}, headers=env.h(env.alice))
    assert r.json()["own"] == {"keep_days": 30, "keep_last": 1}
    # keep_last 1 of the 4 finished untagged ones (ids[1..4]; ids[0] is tagged keep): ids[4] stays, ids[1] is
    # needed by a queued evaluation, ids[2] and ids[3] go
    report = apply_retention(env.queue.engine, env.settings)
    assert [(e["owner"], sorted(e["deleted"])) for e in report] == [("alice", sorted([ids[2], ids[3]]))]
    assert report[0]["freed_bytes"] == 3000
    left = set(_ids(env.get(env.alice, "/v1/jobs", status="succeeded")))
    assert left == {ids[0], ids[1], ids[4]}
    assert not env.settings.job_artifacts_dir(ids[3]).exists()
    assert env.get(env.bob, f"/v1/jobs/{bobs}").status_code == 200  # bob has no rules
    assert env.get(env.alice, f"/v1/jobs/{waiting}").json()["status"] == "queued"
    # bad rules: 422 naming the field; the owner's rules are its own
    for body, field in [({"keep_days": 0}, "keep_days"), ({"keep_last": -1}, "keep_last"),
                        ({"keep_days": "a"}, "keep_days"), ({"keep_days": 36501}, "keep_days"),
                        ({"max_running": 1}, "max_running")]:
        assert _field(env.client.put("/v1/retention", json=body, headers=env.h(env.alice))) == [field], body
    assert env.get(env.bob, "/v1/retention").json()["effective"] == {"keep_days": None, "keep_last": None}
    # the CLI applies every owner's rules, the defaults ('*') included
    PolicyStore(env.queue.engine).set("*", {"keep_last": 1})
    assert cli_main(["cleanup", "--database-url", env.settings.database_url or "", "--data-dir",
                     str(env.settings.data_dir), "--dry-run"]) == 0
    assert env.get(env.bob, f"/v1/jobs/{bobs}").status_code == 200
    assert cli_main(["cleanup", "--database-url", env.settings.database_url or "", "--data-dir",
                     str(env.settings.data_dir)]) == 0
    assert env.get(env.bob, f"/v1/jobs/{bobs}").status_code == 200  # bob's only finished job is his newest


def test_usage_counts_each_owners_files_and_jobs(env: Env) -> None:
    a = env.submit(env.alice).json()["id"]
    env.run_to_end(a)
    b = env.submit(env.bob).json()["id"]
    env.run_to_end(b)
    env.submit(env.alice)
    (env.settings.job_artifacts_dir(b) / "big.bin").write_bytes(b"z" * 10_000)
    u = env.get(env.alice, "/v1/usage").json()
    assert u["owner"] == "alice" and u["jobs"] == {"total": 2, "by_status": {"succeeded": 1, "queued": 1}}
    assert u["artifacts_bytes"] == 1000 and u["checkpoints_bytes"] == 500 and u["total_bytes"] == 1500
    assert u["largest_jobs"] == [{"id": a, "bytes": 1500, "artifacts_bytes": 1000, "checkpoints_bytes": 500}]
    assert env.get(env.bob, "/v1/usage").json()["artifacts_bytes"] == 11_000
    assert env.get(env.admin, "/v1/usage", owner="bob").json()["total_bytes"] == 11_500
    assert _field(env.get(env.alice, "/v1/usage", owner="bob")) == ["query.owner"]
