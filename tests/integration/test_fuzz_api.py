"""Property-based fuzzing of the REST API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation of ``/openapi.json`` gets generated requests (path, query, headers and bodies, both
following the schema and deliberately violating it: schemathesis' positive and negative modes)
against ``create_app`` with authentication on and a real PostgreSQL. Job ids are drawn half the
time from jobs that exist (queued, running with logs and metrics, succeeded with artifacts, a
succeeded tune job with a best configuration, another owner's job), and the bearer token from a
user, an admin, another owner, a revoked token or none.
The property: no answer is a 5xx (and no exception escapes the app). The figures are printed::

    fuzz: <cases> cases over <operations> operations, 5xx seen: <n>
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("RE_FUZZ_EXAMPLES", "24"))  # per operation; the test must stay well under 60 s
# stateful sequences (operations chained by the links schemathesis infers: POST /v1/jobs -> GET /v1/jobs/{id} ...)
STATEFUL_EXAMPLES = int(os.environ.get("RE_FUZZ_STATEFUL_EXAMPLES", "15"))
STATEFUL_STEPS = int(os.environ.get("RE_FUZZ_STATEFUL_STEPS", "10"))  # most steps per sequence
TRAIN = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 500}


def _seed_jobs(client: TestClient, app: Any, settings: Settings, alice: str, bob: str) -> dict[str, list[str]]:
    """Jobs in several states for the fuzzer to hit; returns ids by whether logs?follow can end."""
    queue = app.state.queue
    h = {"Authorization": f"Bearer {alice}"}

    def submit(kind: str, spec: dict[str, Any], token: str = alice) -> str:
        r = client.post("/v1/jobs", json={"kind": kind, "spec": spec}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    done = submit("train", TRAIN)
    lease = queue.claim("fuzz-worker", ("train",))
    assert lease is not None
    for epoch in (1, 2):
        queue.record_metrics(lease.job_id, epoch, {"train_loss": 1 / epoch, "sel_clean_acc": 0.5}, lease.attempt)
        queue.append_logs(lease.job_id, [f"epoch {epoch}"], lease.attempt)
    art = settings.job_artifacts_dir(done)
    (art / "plots").mkdir(parents=True)
    (art / "ensemble.pt").write_bytes(b"weights")
    (art / "plots" / "a.png").write_bytes(b"png")
    assert queue.succeed(lease, {"metrics": {"test_clean_acc": 0.9}, "checkpoint": "ensemble.pt"})

    tune = submit("tune", {"base": {"members": 2, "epochs": 1}, "num_samples": 2, "search_space": {
        "hyperparameters.label_smoothing": {"type": "choice", "values": [0.0, 0.1]}}})
    lease = queue.claim("fuzz-worker", ("tune",))
    assert lease is not None
    queue.upsert_trials(lease.job_id, [{"trial_id": "t1", "status": "TERMINATED", "config": {}, "val_clean_acc": 0.7}])
    best = {**TRAIN, "hyperparameters": {"label_smoothing": 0.1}}
    assert queue.succeed(lease, {"best": {"train_spec": best, "config": {"label_smoothing": 0.1}}})

    running = submit("train", {**TRAIN, "seed": 1})
    lease = queue.claim("fuzz-worker", ("train",))
    assert lease is not None
    queue.append_logs(lease.job_id, ["running"], lease.attempt)
    queued = submit("train", {**TRAIN, "seed": 2})
    evaluate = submit("evaluate", {"target_job": done, "n_examples": 10})
    foreign = submit("train", {**TRAIN, "seed": 3}, token=bob)
    assert client.get(f"/v1/jobs/{foreign}", headers=h).status_code == 404
    return {"terminal": [done, tune, foreign], "live": [running, queued, evaluate]}


def test_fuzzing_the_openapi_schema_finds_no_5xx(pg_url: str, tmp_path: Path) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode

    migrate.upgrade(pg_url)
    cfg = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, retry_backoff_seconds=0.0)
    app = create_app(cfg, warm=False)
    store = TokenStore(app.state.queue.engine)
    alice, _ = store.create("alice")
    bob, _ = store.create("bob")
    admin, _ = store.create("ops", admin=True)
    revoked, rec = store.create("mallory")
    store.revoke(str(rec["id"]))
    with TestClient(app) as client:
        ids = _seed_jobs(client, app, cfg, alice, bob)

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tokens = [alice, alice, alice, admin, bob, revoked, None]
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    operations = []
    t0 = time.monotonic()
    def fuzz(op: Any) -> None:
        streams = op.path.endswith("/logs")

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)),
               data=st.data())
        def run(case: Any, data: Any) -> None:
            params = case.path_parameters or {}
            if "job_id" in params and data.draw(st.booleans()):
                pool = ids["terminal"] if streams else ids["terminal"] + ids["live"]
                params["job_id"] = data.draw(st.sampled_from(pool))
            if streams and params.get("job_id") in ids["live"]:
                case.query = {**(case.query or {}), "follow": "false"}  # a live job's stream never ends
            token = data.draw(st.sampled_from(tokens))
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            cases[op.label] += 1
            try:
                response = case.call(headers=headers)
            except Exception as e:  # an exception escaping the app is a server error too
                server_errors.append(f"{op.label}: {type(e).__name__}: {e}")
                return
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append(f"{op.label} -> {response.status_code}: {response.text[:300]} "
                                     f"(path {params}, query {case.query}, body {str(case.body)[:300]})")

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        operations.append(op.label)
        fuzz(op)
    elapsed = time.monotonic() - t0
    total = sum(cases.values())
    print(f"\nfuzz: {total} cases over {len(operations)} operations in {elapsed:.1f} s (shared 2-core machine), "
          f"5xx seen: {len(server_errors)}; statuses {dict(sorted(statuses.items()))}")
    assert len(operations) >= 14 and min(cases.values()) >= 5, cases
    assert statuses[401] > 0 and statuses[404] > 0 and statuses[422] > 0 and statuses[200] > 0, statuses
    assert server_errors == [], "\n".join(server_errors[:10])
    uuid.UUID(ids["terminal"][0])


def test_stateful_sequences_find_no_5xx(pg_url: str, tmp_path: Path) -> None:
    """Sequences of calls chained by the links schemathesis 4 infers from the schema (a job created by
    ``POST /v1/jobs`` is then read, cancelled, listed, its logs and artifacts asked for ...), against the
    same app with auth on, every sequence from the same seeded state. Tokens rotate (a hash of the operation and
    the call's place in the sequence picks one) between a user, an admin, another
    owner and none; a ``logs`` call never follows (a job created here never ends). The property: no 5xx, no exception.
    Printed: ``fuzz stateful: <sequences> sequences, <steps> steps (<linked> following a link) ...``."""
    import zlib

    import schemathesis
    from hypothesis import HealthCheck, Phase, settings

    migrate.upgrade(pg_url)
    cfg = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, retry_backoff_seconds=0.0)
    app = create_app(cfg, warm=False)
    store = TokenStore(app.state.queue.engine)
    alice, _ = store.create("alice")
    bob, _ = store.create("bob")
    admin, _ = store.create("ops", admin=True)
    engine = app.state.queue.engine

    def fresh_state() -> None:
        # Every sequence starts from the same state: hypothesis replays a sequence's prefix when it explores the
        # next one and must meet the same answers, or it reports flaky data generation (a job created with an
        # Idempotency-Key by an earlier sequence answers 200 instead of 201 the second time; a quota an admin
        # set stays set). Everything but the tokens is emptied and the jobs are seeded again.
        with engine.begin() as c:
            tables = c.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename "
                                    "NOT IN ('alembic_version', 'api_tokens')")).scalars().all()
            c.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE"))
        with TestClient(app) as client:
            _seed_jobs(client, app, cfg, alice, bob)

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tokens = [alice, alice, alice, alice, admin, bob, None]
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    links: Counter[str] = Counter()
    server_errors: list[str] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            counts["sequences"] += 1
            self.n_calls = 0
            fresh_state()

        def step(self, input: Any) -> Any:
            counts["steps"] += 1
            if input.transition is not None:
                counts["linked"] += 1
                links[input.transition.id] += 1
            return super().step(input)

        def before_call(self, case: Any) -> None:
            if case.operation.path.endswith("/logs"):
                case.query = {**(case.query or {}), "follow": "false"}

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            # the token is a function of the operation and the call's place in its sequence, never of the ids
            # in the case (a link fills those in from earlier responses: server-made random UUIDs), so a
            # replayed sequence makes the same calls with the same tokens
            self.n_calls += 1
            key = f"{case.operation.label}#{self.n_calls}"
            token = tokens[zlib.crc32(key.encode()) % len(tokens)]
            return {"headers": {"Authorization": f"Bearer {token}"}} if token else {}

        def call(self, case: Any, **kwargs: Any) -> Any:
            try:
                return case.call(**kwargs)
            except Exception as e:  # an exception escaping the app is a server error too
                server_errors.append(f"{case.operation.label}: {type(e).__name__}: {e}")
                raise

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append(f"{case.operation.label} -> {response.status_code}: {response.text[:300]}")

    t0 = time.monotonic()
    Machine.run(settings=settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS,
                                  deadline=None, database=None, derandomize=True,
                                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)))
    elapsed = time.monotonic() - t0
    print(f"\nfuzz stateful: {counts['sequences']} sequences, {counts['steps']} steps ({counts['linked']} following a "
          f"link) in {elapsed:.1f} s, 5xx seen: {len(server_errors)}; statuses {dict(sorted(statuses.items()))}; "
          f"links used {dict(links.most_common(8))}")
    assert counts["linked"] > 0, "no step followed a link: the schema's links were not inferred"
    assert server_errors == [], "\n".join(server_errors[:10])
