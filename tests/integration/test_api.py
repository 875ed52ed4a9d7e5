"""The REST API against a real PostgreSQL (embedded, migrated with Alembic).

No Ray here: where a test needs a job to have run, it plays the worker's part through the real
queue (claim, metrics, logs, artifacts, final transition), exactly the calls the worker makes.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service import migrate
from service.app import create_app
from service.queue import Queue
from service.settings import Settings

pytestmark = pytest.mark.integration

TRAIN = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": 2,
         "train_subset": 2000, "workers": 2}


class Api:
    def __init__(self, client: TestClient, queue: Queue, settings: Settings, url: str) -> None:
        self.client, self.queue, self.settings, self.url = client, queue, settings, url

    def submit(self, kind: str, spec: dict[str, Any], **headers: str) -> Any:
        return self.client.post("/v1/jobs", json={"kind": kind, "spec": spec}, headers=headers)

    def count_rows(self, table: str = "jobs") -> int:
        with self.queue.engine.connect() as c:
            return int(c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture()
def api(pg_url: str, tmp_path: Path) -> Iterator[Api]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, retry_backoff_seconds=0.0)
    app = create_app(settings, warm=False)
    with TestClient(app) as client:
        yield Api(client, app.state.queue, settings, pg_url)


def _sse(body: str) -> list[dict[str, Any]]:
    """Parse a server-sent events body into ``{"event", "id", "data"}`` dicts."""
    out = []
    for block in body.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = json.loads(value) if key == "data" else value
        if fields:
            out.append(fields)
    return out


def _run_as_worker(api: Api, job_id: str) -> Any:
    lease = api.queue.claim("test-worker")
    assert lease is not None and str(lease.job_id) == job_id
    return lease


# ------------------------------------------------------------------------------------------ submission
def test_submit_returns_201_with_the_resolved_spec_and_the_job_reads_back(api: Api) -> None:
    r = api.submit("train", {"method": "baseline", "members": 3, "hyperparameters": {"label_smoothing": 0.1}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["kind"] == "train" and job["attempts"] == 0
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    uuid.UUID(job["id"])
    assert job["created_at"] and job["progress"] == 0.0
    # resolved: every default filled in, the method's hyperparameters included
    assert job["spec"]["optimizer"] == {"name": "adam", "lr": 0.001, "weight_decay": 0.0, "momentum": 0.9,
                                        "nesterov": False, "betas": [0.9, 0.999], "eps": 1e-08}
    assert job["spec"]["hyperparameters"] == {"label_smoothing": 0.1}
    assert job["spec"]["epochs"] == 2 and job["spec"]["workers"] == 1
    got = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert got == job
    events = api.client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["event"], e["to_status"]) for e in events] == [("created", "queued")]


@pytest.mark.parametrize(("kind", "spec", "field"), [
    ("train", {"method": "baseline", "hyperparameters": {"zeta": 0.5}}, "spec.hyperparameters.zeta"),
    ("train", {"method": "baseline", "hyperparameters": {"label_smoothing": 1.5}},
     "spec.hyperparameters.label_smoothing"),
    ("train", {"members": 0}, "spec.members"),
    ("train", {"method": "no-such-method"}, "spec.method"),
    ("train", {"dataset": "imagenet"}, "spec.dataset"),
    ("train", {"epochs": 2, "schedule": {"name": "multistep", "milestones": [5]}}, "spec.schedule.milestones"),
    ("train", {"membres": 3}, "spec.membres"),
    ("train", {"optimizer": {"lr": -1}}, "spec.optimizer.lr"),
    ("evaluate", {}, "spec.target_job"),
    ("evaluate", {"target_job": "not-a-uuid"}, "spec.target_job"),
    ("evaluate", {"target_job": str(uuid.UUID(int=7))}, "spec.target_job"),
    ("evaluate", {"target_checkpoint": "/x.pt", "attacks": [{"name": "pgd", "eps": []}]}, "spec.attacks.0.eps"),
    ("evaluate", {"target_checkpoint": "/x.pt", "attacks": [{"name": "mora", "steps": 0}]}, "spec.attacks.0.steps"),
    ("evaluate", {"target_checkpoint": "/x.pt", "attacks": [{"name": "mora", "losses": ["vote"]}]},
     "spec.attacks.0"),
    ("evaluate", {"target_checkpoint": "/x.pt", "attacks": [{"name": "pgd", "losses": ["hinge"]}]},
     "spec.attacks.0.losses.0"),
    ("evaluate", {"target_checkpoint": "/x.pt", "attacks": [{"name": "pgd", "vote_temperature": 0}]},
     "spec.attacks.0.vote_temperature"),
    ("evaluate", {"target_checkpoint": "/x.pt", "transfer_attacks": [{"name": "pgd", "losses": ["vote"]}]},
     "spec.transfer_attacks"),
    ("evaluate", {"target_checkpoint": "/x.pt", "checks": {"collapse_gap": 2}}, "spec.checks.collapse_gap"),
    ("tune", {"base": {"members": 0}, "search_space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}},
     "spec.base.members"),
    ("tune", {"base": {}, "search_space": {"lr": {"type": "uniform", "low": 1, "high": 0}}},
     "spec.search_space.lr"),
])
def test_invalid_specs_get_422_naming_the_field_and_create_nothing(api: Api, kind: str, spec: dict[str, Any],
                                                                   field: str) -> None:
    r = api.submit(kind, spec, **{"Idempotency-Key": f"k-{uuid.uuid4()}"})
    assert r.status_code == 422, r.text
    fields = [d["field"] for d in r.json()["detail"]]
    assert field in fields, fields
    assert all(d["msg"] for d in r.json()["detail"])
    assert api.count_rows("jobs") == 0 and api.count_rows("job_events") == 0
    assert api.client.get("/v1/jobs").json()["total"] == 0


def test_request_level_errors_are_422_naming_the_field(api: Api) -> None:
    r = api.client.post("/v1/jobs", json={"kind": "fly", "spec": {}})
    assert r.status_code == 422 and "kind" in [d["field"] for d in r.json()["detail"]]
    r = api.client.post("/v1/jobs", json={"kind": "train", "spec": {}, "priority": 10**6})
    assert r.status_code == 422 and "priority" in [d["field"] for d in r.json()["detail"]]
    r = api.client.get("/v1/jobs", params={"status": "sleeping"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "query.status"
    assert api.client.get("/v1/jobs/not-a-uuid").status_code == 422
    assert api.client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert api.count_rows() == 0


def test_evaluate_of_a_train_job_depends_on_it_and_waits_for_it(api: Api) -> None:
    train = api.submit("train", TRAIN).json()
    r = api.submit("evaluate", {"target_job": train["id"], "n_examples": 100})
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["depends_on"] == [train["id"]] and ev["spec"]["target_job"] == train["id"]
    # the evaluate job is not claimable while its train job has not succeeded
    lease = api.queue.claim("w")
    assert lease is not None and str(lease.job_id) == train["id"]
    assert api.queue.claim("w") is None
    assert api.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.9}})
    lease2 = api.queue.claim("w")
    assert lease2 is not None and str(lease2.job_id) == ev["id"]
    # naming an evaluate job as the target is a 422
    r = api.submit("evaluate", {"target_job": ev["id"]})
    assert r.status_code == 422 and "expected a train job" in r.json()["detail"][0]["msg"]


# ------------------------------------------------------------------------------------------ idempotency
def test_idempotent_replays_return_one_job(api: Api) -> None:
    key = {"Idempotency-Key": "submit-123"}
    first = api.submit("train", TRAIN, **key)
    second = api.submit("train", TRAIN, **key)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert "idempotent-replayed" not in first.headers and second.headers["idempotent-replayed"] == "true"
    # the key with a different request is a conflict, and creates nothing
    other = api.submit("train", {**TRAIN, "epochs": 3}, **key)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert api.count_rows() == 1

    # concurrent replays of a new key: still exactly one job
    ids: list[str] = []
    lock = threading.Lock()

    def post() -> None:
        r = api.submit("train", TRAIN, **{"Idempotency-Key": "race"})
        with lock:
            ids.append(r.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert api.count_rows() == 2


# ------------------------------------------------------------------------------------------ listing
def test_list_filters_by_status_and_kind_and_paginates(api: Api) -> None:
    trains = [api.submit("train", {**TRAIN, "seed": i}).json()["id"] for i in range(5)]
    ev = api.submit("evaluate", {"target_checkpoint": "/tmp/x.pt"}).json()["id"]
    api.client.post(f"/v1/jobs/{trains[0]}/cancel")
    page = api.client.get("/v1/jobs", params={"limit": 4}).json()
    assert page["total"] == 6 and len(page["items"]) == 4
    assert [j["id"] for j in page["items"]] == [ev, *reversed(trains[1:])][:4]  # newest first
    page2 = api.client.get("/v1/jobs", params={"limit": 4, "offset": 4}).json()
    assert [j["id"] for j in page2["items"]] == [trains[1], trains[0]]
    assert api.client.get("/v1/jobs", params={"kind": "evaluate"}).json()["total"] == 1
    cancelled = api.client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [trains[0]]
    both = api.client.get("/v1/jobs", params=[("status", "cancelled"), ("status", "queued"), ("kind", "train")])
    assert both.json()["total"] == 5
    assert api.client.get("/v1/jobs", params={"status": "queued,cancelled"}).json()["total"] == 6


# ------------------------------------------------------------------------------------------ cancel
def test_cancel_of_a_queued_job_is_immediate_and_fails_its_dependents(api: Api) -> None:
    train = api.submit("train", TRAIN).json()
    ev = api.submit("evaluate", {"target_job": train["id"]}).json()
    r = api.client.post(f"/v1/jobs/{train['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["cancel_requested"]
    assert r.json()["finished_at"] is not None
    again = api.client.post(f"/v1/jobs/{train['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    dep = api.client.get(f"/v1/jobs/{ev['id']}").json()
    assert dep["status"] == "failed" and f"dependency {train['id']} (train) ended cancelled" in dep["error"]
    assert api.queue.claim("w") is None  # nothing is left to run
    events = api.client.get(f"/v1/jobs/{train['id']}/events").json()
    assert [e["event"] for e in events] == ["created", "cancelled"]
    # an evaluation of a cancelled train job is refused at submission
    r = api.submit("evaluate", {"target_job": train["id"]})
    assert r.status_code == 422 and "ended cancelled" in r.json()["detail"][0]["msg"]


def test_cancel_of_a_running_job_asks_its_worker_and_a_finished_job_cannot_be_cancelled(api: Api) -> None:
    job = api.submit("train", TRAIN).json()
    lease = _run_as_worker(api, job["id"])
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.json()["status"] == "cancelling"
    hb = api.queue.heartbeat(lease)
    assert hb.ok and hb.cancel_requested  # what the worker's heartbeat thread sees
    assert api.queue.mark_cancelled(lease)
    assert api.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"

    done = api.submit("train", {**TRAIN, "seed": 9}).json()
    lease = _run_as_worker(api, done["id"])
    api.queue.succeed(lease, {"metrics": {}})
    r = api.client.post(f"/v1/jobs/{done['id']}/cancel")
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]
    assert api.client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


# ------------------------------------------------------------------------------------------ outputs
def test_metrics_logs_results_and_artifacts_of_a_job(api: Api) -> None:
    job = api.submit("train", TRAIN).json()
    jid = job["id"]
    assert api.client.get(f"/v1/jobs/{jid}/results").status_code == 409  # not finished yet
    lease = _run_as_worker(api, jid)
    for epoch, loss in ((1, 0.9), (2, 0.5)):
        api.queue.record_metrics(lease.job_id, epoch, {"train_loss": loss, "sel_clean_acc": 0.5 + epoch / 10,
                                                       "stage_name": "all", "bad": float("nan")}, lease.attempt)
        api.queue.set_progress(lease, epoch / 2, stage="all", epoch=epoch, total_epochs=2)
        api.queue.append_logs(lease.job_id, [f"stage 1 epoch {epoch} | loss {loss}"], lease.attempt)
    running = api.client.get(f"/v1/jobs/{jid}").json()
    assert running["status"] == "running" and running["progress"] == 1.0 and running["epoch"] == 2
    assert running["total_epochs"] == 2 and running["stage"] == "all" and running["attempts"] == 1

    art = api.settings.job_artifacts_dir(jid)
    (art / "plots").mkdir(parents=True)
    (art / "ensemble.pt").write_bytes(b"\x00weights\x01")
    (art / "plots" / "acc.png").write_bytes(b"png")
    (art / ".tmp-partial.pt").write_bytes(b"x")
    (api.settings.artifacts_root / "secret.txt").write_text("not yours")
    assert api.queue.succeed(lease, {"metrics": {"test_clean_acc": 0.97}, "checkpoint": "ensemble.pt"})

    m = api.client.get(f"/v1/jobs/{jid}/metrics").json()
    assert m["names"] == ["sel_clean_acc", "train_loss"]  # numbers only; NaN and strings dropped
    assert [(p["name"], p["step"], p["value"]) for p in m["items"] if p["name"] == "train_loss"] == [
        ("train_loss", 1, 0.9), ("train_loss", 2, 0.5)]
    one = api.client.get(f"/v1/jobs/{jid}/metrics", params={"name": "train_loss"}).json()
    assert len(one["items"]) == 2

    logs = api.client.get(f"/v1/jobs/{jid}/logs").json()
    assert [x["line"] for x in logs["items"]] == ["stage 1 epoch 1 | loss 0.9", "stage 1 epoch 2 | loss 0.5"]
    tail = api.client.get(f"/v1/jobs/{jid}/logs", params={"after": logs["items"][0]["id"]}).json()
    assert [x["line"] for x in tail["items"]] == ["stage 1 epoch 2 | loss 0.5"]
    assert tail["next_after"] == logs["items"][1]["id"]

    # follow=true: server-sent events, every line then an end event with the final status
    with api.client.stream("GET", f"/v1/jobs/{jid}/logs", params={"follow": "true"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = _sse(body)
    assert [e["event"] for e in events] == ["log", "log", "end"]
    assert [e["data"]["line"] for e in events[:2]] == ["stage 1 epoch 1 | loss 0.9", "stage 1 epoch 2 | loss 0.5"]
    assert events[1]["id"] == str(logs["items"][1]["id"])  # a reconnect with Last-Event-ID resumes after it
    assert events[-1]["data"] == {"status": "succeeded", "error": None}
    with api.client.stream("GET", f"/v1/jobs/{jid}/logs", params={"follow": "true"},
                           headers={"Last-Event-ID": events[0]["id"]}) as r:
        resumed = _sse("".join(r.iter_text()))
    assert [e["event"] for e in resumed] == ["log", "end"]

    assert api.client.get(f"/v1/jobs/{jid}/results").json() == {"metrics": {"test_clean_acc": 0.97},
                                                                 "checkpoint": "ensemble.pt"}
    arts = api.client.get(f"/v1/jobs/{jid}/artifacts").json()["items"]
    assert sorted(a["name"] for a in arts) == ["ensemble.pt", "plots/acc.png"]
    assert {a["name"]: a["size"] for a in arts}["ensemble.pt"] == 9
    d = api.client.get(f"/v1/jobs/{jid}/artifacts/ensemble.pt")
    assert d.status_code == 200 and d.content == b"\x00weights\x01"
    assert api.client.get(f"/v1/jobs/{jid}/artifacts/plots/acc.png").content == b"png"
    # only the job's own directory is served
    for bad in ("../secret.txt", "..%2Fsecret.txt", "plots/../../secret.txt", ".tmp-partial.pt", "missing.pt",
                "%2E%2E/secret.txt"):
        assert api.client.get(f"/v1/jobs/{jid}/artifacts/{bad}").status_code == 404, bad


def test_trials_of_a_tune_job_are_child_rows(api: Api) -> None:
    tune = api.submit("tune", {"base": {"members": 2}, "search_space": {
        "hyperparameters.label_smoothing": {"type": "choice", "values": [0.0, 0.1]}}, "num_samples": 2})
    assert tune.status_code == 201, tune.text
    tid = tune.json()["id"]
    api.queue.upsert_trials(uuid.UUID(tid), [
        {"trial_id": "t1", "status": "RUNNING", "config": {"label_smoothing": 0.0}, "val_clean_acc": 0.5},
        {"trial_id": "t2", "status": "PENDING", "config": {"label_smoothing": 0.1}}])
    api.queue.upsert_trials(uuid.UUID(tid), [
        {"trial_id": "t1", "status": "TERMINATED", "config": {"label_smoothing": 0.0}, "val_clean_acc": 0.8}])
    trials = api.client.get(f"/v1/jobs/{tid}/trials").json()
    assert trials["total"] == 2
    by = {t["spec"]["trial_id"]: t for t in trials["items"]}
    assert by["t1"]["status"] == "succeeded" and by["t1"]["result"]["val_clean_acc"] == 0.8
    assert by["t2"]["status"] == "queued" and by["t1"]["parent_id"] == tid and by["t1"]["kind"] == "trial"
    assert api.client.get("/v1/jobs", params={"parent_id": tid}).json()["total"] == 2
    assert api.client.get("/v1/jobs").json()["total"] == 1  # trials are not top-level jobs
    assert api.client.get("/v1/jobs", params={"kind": "trial"}).json()["total"] == 2
    assert api.queue.claim("w", ("train", "evaluate")) is None  # trial rows are never claimed


# ------------------------------------------------------------------------------------------ health, methods, schema
def test_health_readiness_methods_and_openapi(api: Api, pg_server: Any) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["schema"] == migrate.head_revision()

    methods = api.client.get("/v1/methods").json()["items"]
    baseline = next(m for m in methods if m["name"] == "baseline")
    assert baseline["hyperparameters"]["label_smoothing"]["default"] == 0.0
    assert baseline["hyperparameters"]["label_smoothing"]["description"]
    assert api.client.get("/v1/methods/baseline").json()["name"] == "baseline"
    assert api.client.get("/v1/methods/nope").status_code == 404

    attacks = api.client.get("/v1/attacks").json()
    by = {a["name"]: a for a in attacks["attacks"]}
    assert {"pgd", "mora", "autoattack", "autoattack_port", "square", "fgsm"} <= set(by)
    assert by["mora"]["losses"] == ["ce", "cw", "dlr"] and "mora_mode" in by["mora"]["parameters"]
    assert by["pgd"]["parameters"]["steps"] == {"default": 40, "minimum": 1, "maximum": 10000}
    assert "vote" in by["pgd"]["losses"] and "vote" in attacks["losses"]
    assert api.client.get("/v1/attacks/mora").json()["name"] == "mora"
    assert api.client.get("/v1/attacks/nope").status_code == 404

    schema = api.client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/metrics",
                 "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/results", "/v1/jobs/{job_id}/artifacts",
                 "/v1/jobs/{job_id}/artifacts/{name}", "/v1/methods", "/v1/attacks", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    assert "Idempotency-Key" in json.dumps(schema["paths"]["/v1/jobs"]["post"])


def test_readyz_is_503_until_the_database_is_migrated(pg_url: str, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, database_url=pg_url), warm=False)
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "db upgrade" in r.json()["detail"]
        migrate.upgrade(pg_url)
        assert client.get("/readyz").status_code == 200
    migrate.downgrade(pg_url, "base")  # the migration is reversible
    engine = create_engine(pg_url)
    with engine.connect() as c:
        tables = c.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
    engine.dispose()
    assert set(tables) <= {"alembic_version"}


def test_the_leaderboard_resource_serves_the_generated_document(pg_url: str, tmp_path: Path) -> None:
    from ensemble_core import leaderboard as lb

    migrate.upgrade(pg_url)
    doc_path = tmp_path / "results" / "leaderboard.json"
    settings = Settings(data_dir=tmp_path, database_url=pg_url, leaderboard_path=doc_path)
    with TestClient(create_app(settings, warm=False)) as client:
        r = client.get("/v1/leaderboard")
        assert r.status_code == 404 and "robust-ensembles leaderboard" in r.json()["detail"]
        # the generator's own output (a finished baseline cell and methods not run yet), served as it is
        cell = lb._cell_path(tmp_path / "runs", "mnist", "baseline")
        cell.parent.mkdir(parents=True)
        cell.write_text(json.dumps({"method": "baseline", "status": "done", "clean_acc": 0.99, "transfer_mean": 0.5,
                                    "transfer": [{"attack": "pgd-10 (ce+cw)", "eps": 0.1, "robust_acc": 0.5,
                                                  "unreliable": False}], "white_box": [],
                                    "any_attack": [{"attack": "any attack (Linf)", "eps": 0.1, "robust_acc": 0.4,
                                                    "unreliable": False}], "any_attack_mean": 0.4}))
        doc_path.parent.mkdir()
        doc_path.write_text(json.dumps(lb.collect(tmp_path / "runs", ["mnist", "fashion_mnist"],
                                                  ["baseline", "pdd"], lb.BUDGET)))
        body = client.get("/v1/leaderboard").json()
        assert body["budget"]["train_subset"] == lb.BUDGET["train_subset"] and set(body["datasets"]) == {
            "mnist", "fashion_mnist"}
        rows = body["datasets"]["mnist"]["rows"]
        assert [(x["method"], x["status"], x["rank"]) for x in rows] == [("baseline", "done", 1),
                                                                         ("pdd", "not run", None)]
        assert rows[0]["any_attack_mean"] == 0.4
        assert body["headline"] == []  # a quick-mode document alone
        doc = json.loads(doc_path.read_text())  # with the campaigns' summaries (none recorded in this folder)
        doc_path.write_text(json.dumps(doc | {"headline": lb.campaign_headlines(doc_path.parent)}))
        heads = client.get("/v1/leaderboard").json()["headline"]
        assert [h["campaign"] for h in heads] == ["cldl-table4", "dkd-table3", "cldl-table8"]
        assert heads[0]["train_units"]["recorded"] == 0 and heads[0]["rows"][0]["seeds_trained"] == []
        only = client.get("/v1/leaderboard", params={"dataset": "fashion_mnist"}).json()
        assert list(only["datasets"]) == ["fashion_mnist"]
        bad = client.get("/v1/leaderboard", params={"dataset": "cifar100"})
        assert bad.status_code == 422 and "dataset" in bad.text
        doc_path.write_text('{"format": "something else"}')
        assert client.get("/v1/leaderboard").status_code == 404
