"""Queue: claims per second with 8 concurrent claimers on a local PostgreSQL, and the p50/p99 latency
of ``GET /v1/jobs/{id}`` under a bounded local load.

Both run against a throwaway embedded PostgreSQL (as tests/conftest.py starts it, fsync off). Claims:
``Queue.claim`` (``FOR UPDATE SKIP LOCKED``) from 8 threads with their own pooled connections until the
queue is empty; every job must be claimed exactly once. Reference: the same with 1 claimer. Latency: the
real app served by uvicorn on 127.0.0.1, a closed loop of 4 client threads (each sends its next
request when the previous one has answered), so the load is bounded by the client count.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import embedded_postgres, header, percentile, save, table


def _run_together(target: Callable[[int], None], n: int, barrier: threading.Barrier) -> float:
    """Start ``n`` threads of ``target(i)``, release them together at ``barrier``; seconds until all end."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def claim_rate(queue: Any, jobs: int, claimers: int) -> dict[str, Any]:
    """Submit ``jobs`` train jobs, then drain them with ``claimers`` threads; claims per second."""
    for _ in range(jobs):
        queue.submit("train", {"method": "baseline", "bench": True})
    claimed: list[list[uuid.UUID]] = [[] for _ in range(claimers)]
    barrier = threading.Barrier(claimers + 1)

    def claimer(i: int) -> None:
        barrier.wait()
        while (lease := queue.claim(f"bench-{i}")) is not None:
            claimed[i].append(lease.job_id)

    elapsed = _run_together(claimer, claimers, barrier)
    ids = [j for c in claimed for j in c]
    if len(ids) != jobs or len(set(ids)) != jobs:
        raise AssertionError(f"{len(ids)} claims of {len(set(ids))} distinct jobs, expected {jobs} each")
    return {"claimers": claimers, "jobs": jobs, "seconds": elapsed, "claims_per_s": jobs / elapsed,
            "per_claimer": "/".join(str(len(c)) for c in claimed)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_latency(app: Any, job_ids: list[str], clients: int = 4, requests_per_client: int = 150) -> dict[str, Any]:
    """p50/p99 of GET /v1/jobs/{id} over HTTP with ``clients`` closed-loop clients."""
    import httpx
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            c.get(f"/v1/jobs/{job_ids[0]}")  # connection set up outside the timed requests
            barrier.wait()
            for k in range(requests_per_client):
                jid = job_ids[(i * requests_per_client + k) % len(job_ids)]
                t0 = time.perf_counter()
                r = c.get(f"/v1/jobs/{jid}")
                lat[i].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")

    elapsed = _run_together(client, clients, barrier)
    server.should_exit = True
    thread.join(10)
    if errors:
        raise AssertionError(f"{len(errors)} failed requests, first: {errors[0]}")
    flat = [x for xs in lat for x in xs]
    return {"clients": clients, "requests": len(flat), "p50_ms": 1000 * percentile(flat, 50),
            "p99_ms": 1000 * percentile(flat, 99), "max_ms": 1000 * max(flat), "requests_per_s": len(flat) / elapsed}


def run(jobs: int = 400, claimers: int = 8) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    from service import migrate
    from service.app import create_app
    from service.db import make_engine
    from service.queue import Queue
    from service.settings import Settings

    with embedded_postgres() as url:
        migrate.upgrade(url)
        engine = make_engine(url, pool_size=claimers, max_overflow=2)
        queue = Queue(engine)
        rows = [claim_rate(queue, jobs // 2, 1), claim_rate(queue, jobs, claimers)]
        ids = [str(j["id"]) for j in queue.list(limit=200)[0]]
        engine.dispose()
        app = create_app(Settings(data_dir=Path(tempfile.mkdtemp(prefix="re-bench-q-")), database_url=url),
                         warm=False)
        lat = get_latency(app, ids)
    print(header(f"queue: claims/s with {claimers} concurrent claimers vs 1 (embedded PostgreSQL, fsync off); "
                 f"GET /v1/jobs/{{id}} latency over HTTP (uvicorn, {lat['clients']} closed-loop clients)", load0))
    print(table(rows, ["claimers", "jobs", "seconds", "claims_per_s", "per_claimer"]))
    print(f"claims/s {claimers} claimers / 1 claimer: {rows[1]['claims_per_s'] / rows[0]['claims_per_s']:.2f}")
    print(table([lat], ["clients", "requests", "p50_ms", "p99_ms", "max_ms", "requests_per_s"]))
    result = {"claims": rows, "get_latency": lat}
    save("queue", result, load0)
    return result
