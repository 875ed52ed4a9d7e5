"""DDP start-up against Ray's idle worker pool: which processes one Ray Train run starts, and whether a warm
pool of prestarted workers with torch already imported shortens a 2-worker DDP job's start-up.

Issue "Warm start" asks for a multi-worker DDP job's start-up at most half of the path before, with Ray
Train's ``TorchTrainer`` kept. Ray keeps a pool of idle worker processes; its raylet can prestart them
(``enable_worker_prestart``) and import modules in them before any task arrives (``preload_python_modules``).
This benchmark runs the ``service`` benchmark's DDP jobs (the same small spec, ``workers: 2``, the real API and
job worker) three times in a row, first with an empty data-set cache, on two private Rays started the same way
except for those two settings, each left idle for ``SETTLE_S`` seconds first (a warm ``up`` service):

* ``default``: Ray as the service starts it;
* ``preloaded pool``: idle workers prestarted with ``torch`` and ``ray.train.torch`` imported.

While the first job of each runs, ``ps`` is sampled every 0.5 s: every ``ray::`` process seen, with its start
time, shows which processes the run found in the pool and which it started. Ratio printed: the preloaded
pool's mean time to the first step over the default's, jobs with the cache filled (target of the issue's
item, for comparison: 0.5 of the path before). Opt-in (``python -m bench ddp-pool``): it starts two Rays.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import embedded_postgres, header, private_ray, save, table
from bench.service_overhead import SPEC, service

SETTLE_S = 45.0
PRELOAD = ["torch", "ray.train.torch"]
CONFIGS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "preloaded pool": {"enable_worker_prestart": True, "prestart_worker_first_driver": True,
                       "preload_python_modules": PRELOAD},
}


def ray_processes() -> dict[int, tuple[float, str]]:
    """``pid -> (start time, title)`` of this machine's ``ray::`` worker processes (idle or running an actor;
    the title is the actor's class once it runs one)."""
    out = subprocess.run(["ps", "-eo", "pid=,etimes=,args="], capture_output=True, text=True).stdout
    now, procs = time.time(), {}
    for line in out.splitlines():
        pid, etimes, args = line.split(None, 2)
        if args.startswith("ray::"):
            procs[int(pid)] = (now - int(etimes), args.split()[0])
    return procs


def run_config(name: str, system_config: dict[str, Any] | None, settle_s: float = SETTLE_S) -> dict[str, Any]:
    """Three DDP jobs on a private Ray configured by ``system_config``; the processes the first one started."""
    from ensemble_core.datacache import CACHE_ENV

    data_dir = Path(tempfile.mkdtemp(prefix="re-bench-ddp-pool-"))
    # the cold path (one TorchTrainer.fit() per job) is what Ray's worker pool could speed up; a warm DDP group,
    # the default, starts no processes for a reused group
    env = mock.patch.dict(os.environ, {CACHE_ENV: str(data_dir / "dataset-cache"), "RE_WARM_DDP": "0"})
    env.start()
    spec = {**SPEC, "workers": 2}
    seen: dict[int, tuple[float, str]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid, (t0, title) in ray_processes().items():
                if pid not in seen or title != "ray::IDLE":
                    seen[pid] = (seen.get(pid, (t0, ""))[0], title)
            stop.wait(0.5)

    try:
        with private_ray(num_cpus=2, system_config=system_config), embedded_postgres() as url:
            time.sleep(settle_s)
            before = ray_processes()
            idle = {pid for pid, (_, title) in before.items() if title == "ray::IDLE"}
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            rows = service(spec, url, data_dir, jobs=[(f"{name}, cache empty", spec)])
            stop.set()
            watcher.join()
            rows += service(spec, url, data_dir, jobs=[(f"{name}, cache filled", spec),
                                                         (f"{name}, cache filled, again", spec)])
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        env.stop()
    started = sorted(title for pid, (_, title) in seen.items() if pid not in before)
    reused = sorted(title for pid, (_, title) in seen.items() if pid in idle and title != "ray::IDLE")
    return {"rows": rows, "idle_before_run": len(idle), "processes_started": started, "pool_processes_used": reused}


def run() -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    results = {name: run_config(name, cfg) for name, cfg in CONFIGS.items()}
    rows = [{"path": r["path"], "to_first_step_s": r["to_first_step_s"],
             **{k: r["startup_s"].get(k, 0.0) for k in ("ray_scheduling", "worker_start", "first_batch", "total")}}
            for res in results.values() for r in res["rows"]]
    print(header("DDP start-up against Ray's idle worker pool (2 Ray Train workers, gloo; "
                 f"each Ray idle {SETTLE_S:.0f} s first)", load0))
    print(table(rows, ["path", "to_first_step_s", "ray_scheduling", "worker_start", "first_batch", "total"]))
    for name, res in results.items():
        print(f"{name}: {res['idle_before_run']} idle workers before the run; the first run started "
              f"{len(res['processes_started'])} processes: {', '.join(res['processes_started'])}; "
              f"from the pool: {', '.join(res['pool_processes_used']) or 'none'}")
    filled = {name: statistics.mean(r["to_first_step_s"] for r in res["rows"][1:]) for name, res in results.items()}
    ratio = filled["preloaded pool"] / filled["default"]
    print(f"time to first step, cache filled, preloaded pool / default: {ratio:.3f} "
          f"({filled['preloaded pool']:.1f} against {filled['default']:.1f} s)")
    payload = {"results": results, "ratio_preloaded_over_default": ratio}
    save("ddp_pool", payload, load0)
    return payload
