"""Submission storm: many concurrent ``POST /v1/jobs`` through uvicorn, half of them replays.

``python -m bench storm`` (issue #27): 1,000 requests at once against the real API (``create_app`` served
by uvicorn in its own process, authentication on, two owners, an embedded PostgreSQL): 500 distinct
``Idempotency-Key`` values, each sent twice, in a seeded shuffled order. Every 10th key's second request
has a different body, so it must get **409**; every other replay must return the first job
(``Idempotent-Replayed: true``, same id). Afterwards exactly 500 jobs exist (counted in the database)
and no answer is a 5xx or a transport error. Latency is per request, from the moment all requests were
released to its answer (p50 / p99 / max), plus the wall time of the whole storm; the server is warmed
first (one ``GET /v1/methods``, which loads the method registry that spec validation needs).

The same code runs CI-sized in ``tests/integration/test_storm.py`` (fewer keys). Sizes:
``RE_STORM_KEYS`` (default 500), ``RE_STORM_CONFLICT_EVERY`` (default 10), ``RE_STORM_SEED`` (default 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import embedded_postgres, header, percentile, save

SPEC: dict[str, Any] = {"method": "baseline", "members": 2, "epochs": 1, "train_subset": 500}

SERVER = r"""
import sys
import uvicorn
from pathlib import Path
from service.app import create_app
from service.settings import Settings

url, port, data_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
app = create_app(Settings(data_dir=data_dir, database_url=url, auth=True), warm=False)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=4096,
            timeout_keep_alive=30)
"""


@dataclass(frozen=True)
class Request:
    """One submission of the storm."""

    key: str
    token: str
    spec: dict[str, Any]
    replay: bool  # the key's second request
    conflicting: bool  # a replay with a different body: must be 409


def plan(n_keys: int, tokens: list[str], *, conflict_every: int = 10, seed: int = 0) -> list[Request]:
    """``2 * n_keys`` requests in a seeded random order: each key twice; every ``conflict_every``-th key's
    second request has a different body. Keys are spread over ``tokens`` (owners) round robin."""
    if n_keys < 1 or conflict_every < 1:
        raise ValueError("n_keys and conflict_every must be positive")
    reqs = []
    for i in range(n_keys):
        key, token = f"storm-{seed}-{i:05d}", tokens[i % len(tokens)]
        spec = {**SPEC, "seed": i}
        conflicting = i % conflict_every == 0
        reqs.append(Request(key, token, spec, False, False))
        reqs.append(Request(key, token, {**spec, "epochs": 2} if conflicting else spec, True, conflicting))
    random.Random(seed).shuffle(reqs)
    return reqs


def check(reqs: list[Request], answers: list[tuple[int, dict[str, Any], bool, float]], jobs_in_db: int
          ) -> dict[str, Any]:
    """The storm's invariants from its answers ``(status, body, replayed, latency)``; returns the figures.

    Per key: two identical requests give one job (both 201, the same id, one of them marked replayed);
    two different requests give one 201 and one 409, whichever arrived first winning. In all: one job
    per key in the database, no 5xx, no transport error (status 0)."""
    by_key: dict[str, list[tuple[Request, tuple[int, dict[str, Any], bool, float]]]] = {}
    for r, a in zip(reqs, answers, strict=True):
        by_key.setdefault(r.key, []).append((r, a))
    problems: list[str] = []
    statuses = Counter(a[0] for a in answers)
    for key, pair in by_key.items():
        codes = sorted(a[0] for _, a in pair)
        if pair[0][0].conflicting or pair[1][0].conflicting:
            if codes != [201, 409]:
                problems.append(f"{key}: a replay with another body gave {codes}, expected [201, 409]")
        else:
            ids = {a[1].get("id") for _, a in pair}
            replayed = sorted(a[2] for _, a in pair)
            if codes != [201, 201] or len(ids) != 1 or replayed != [False, True]:
                problems.append(f"{key}: identical requests gave {codes}, ids {ids}, replayed flags {replayed}")
    n_keys = len(by_key)
    if jobs_in_db != n_keys:
        problems.append(f"{jobs_in_db} jobs in the database for {n_keys} keys")
    latencies = [a[3] for a in answers]
    return {"requests": len(reqs), "keys": n_keys, "jobs_in_db": jobs_in_db,
            "expected_409": sum(r.conflicting for r in reqs), "statuses": dict(sorted(statuses.items())),
            "server_errors": sum(n for s, n in statuses.items() if s >= 500 or s == 0),
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "max_s": max(latencies),
            "problems": problems}


async def _fire(url: str, reqs: list[Request], timeout_s: float) -> list[tuple[int, dict[str, Any], bool, float]]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
        go = asyncio.Event()

        async def one(r: Request) -> tuple[int, dict[str, Any], bool, float]:
            await go.wait()
            t0 = time.perf_counter()
            try:
                resp = await client.post("/v1/jobs", json={"kind": "train", "spec": r.spec},
                                         headers={"Authorization": f"Bearer {r.token}", "Idempotency-Key": r.key})
                body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
                return (resp.status_code, body, resp.headers.get("idempotent-replayed") == "true",
                        time.perf_counter() - t0)
            except httpx.HTTPError as e:
                return 0, {"error": f"{type(e).__name__}: {e}"}, False, time.perf_counter() - t0

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        await asyncio.sleep(0.2)  # every task waits at the gate
        go.set()
        return list(await asyncio.gather(*tasks))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_storm(database_url: str, *, n_keys: int = 500, conflict_every: int = 10, seed: int = 0,
              timeout_s: float = 120.0) -> dict[str, Any]:
    """Migrate ``database_url``, serve the API with uvicorn in a subprocess, fire the storm, check it."""
    import httpx
    from sqlalchemy import text

    from service import migrate
    from service.auth import TokenStore
    from service.db import make_engine

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = TokenStore(engine)
    tokens = [store.create("storm-a")[0], store.create("storm-b")[0]]
    with engine.connect() as c:
        before = int(c.execute(text("SELECT count(*) FROM jobs")).scalar_one())
    port = _free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="re-storm-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, database_url, str(port), str(data_dir)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)
        # warm-up: the first spec validation imports the method registry (torch), seconds on a small machine
        httpx.get(url + "/v1/methods", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=120)
        reqs = plan(n_keys, tokens, conflict_every=conflict_every, seed=seed)
        t0 = time.perf_counter()
        answers = asyncio.run(_fire(url, reqs, timeout_s))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    with engine.connect() as c:
        jobs = int(c.execute(text("SELECT count(*) FROM jobs")).scalar_one()) - before
    engine.dispose()
    figures = check(reqs, answers, jobs)
    figures.update(wall_s=wall, throughput_rps=len(reqs) / wall, concurrency=len(reqs))
    return figures


def run() -> None:
    """``python -m bench storm``."""
    load = os.getloadavg()[0]
    n_keys = int(os.environ.get("RE_STORM_KEYS", "500"))
    conflict_every = int(os.environ.get("RE_STORM_CONFLICT_EVERY", "10"))
    seed = int(os.environ.get("RE_STORM_SEED", "0"))
    print(header(f"submission storm: {2 * n_keys} concurrent POST /v1/jobs, {n_keys} keys each sent twice", load))
    with embedded_postgres() as url:
        figures = run_storm(url, n_keys=n_keys, conflict_every=conflict_every, seed=seed)
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    path = save("storm", {"figures": figures}, load)
    print(json.dumps({k: v for k, v in figures.items() if k != "problems"}, indent=1, default=str))
    for p in figures["problems"][:20]:
        print("PROBLEM:", p)
    print(f"storm: {figures['requests']} requests, {figures['jobs_in_db']} jobs for {figures['keys']} keys, "
          f"409 x {figures['statuses'].get(409, 0)} (expected {figures['expected_409']}), "
          f"5xx/transport errors {figures['server_errors']}, p50 {figures['p50_s']:.3f} s, "
          f"p99 {figures['p99_s']:.3f} s, wall {figures['wall_s']:.1f} s -> {path}")
    if figures["problems"] or figures["server_errors"]:
        raise SystemExit(1)


__all__ = ["Request", "check", "plan", "run", "run_storm"]
