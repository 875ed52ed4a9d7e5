"""Service overhead: ``POST /v1/jobs`` to the first training step / a bare ``TorchTrainer.fit()`` to its
first step, and the start-up share of a small job.

Both sides train the same small spec with one Ray Train worker (1 CPU, 1 torch thread, the service's
default) on a private local Ray. The service side is the real stack: the FastAPI app on an embedded
PostgreSQL (as tests/conftest.py starts it), one ``Worker`` claiming the job and driving Ray Train;
the client polls ``GET /v1/jobs/{id}`` every 50 ms. The bare side is a ``TorchTrainer`` whose loop
calls the same ``train_ensemble``.

"First step" is observed the same way on both sides, from the end of the first epoch: the time at
which epoch 1 is seen (by the REST client; by the loop itself for the bare trainer) minus that epoch's
own step time (``epoch_time_s``). What remains is the start-up before the first step plus the epoch's
selection-subset evaluation (the same work on both sides) plus, for the service, its reporting path
(checkpoint report, channel, database, polling) — which is part of the overhead being measured.

The warm rows run the service with ``RE_WARM_TRAIN=1`` (workers/warm.py): two jobs in a row on one worker,
the first on a new warm actor, the second on the same actor, reused (issue "Warm start": first step within
5 s of ``POST /v1/jobs``).

The evaluate rows follow the warm rows on the same worker: two small evaluate jobs in a row against the last
train job's ensemble (PGD-10 at one eps on 100 report images in batches of 50, no checks), each timed from
``POST /v1/jobs`` to the first attacked batch (the job's ``stage`` names a white-box unit's batch: the runner
reports it when the batch is done) and to the end. Evaluate jobs of this size run inside the worker process,
which keeps torch and the decoded data sets after its first job (issue "Warm start": first attacked batch
within 3 s).

The DDP rows run first: the same spec with ``workers: 2`` on the cold path (Ray Train, gloo), twice, the
first with an empty data-set cache (every rank decodes MNIST, as before ``ensemble_core/datacache.py``), the
second with the cache the first one filled; then the same job twice on a warm DDP group (``RE_WARM_DDP=1``,
workers/warm_ddp.py): first on a new group, then on the same group, reused (issue "Warm start": DDP start-up at
most half of the path before).

Every train row also gets its start-up breakdown from the job's results (``startup_s``, workers/startup.py):
seconds from the job worker's call to the first step, per phase.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import embedded_postgres, header, private_ray, save, table

SPEC: dict[str, Any] = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3,
                        "epochs": 2, "batch_size": 64, "train_subset": 1024, "val_size": 0, "eval_subset": 200,
                        "workers": 1, "seed": 0}
EVAL_SPEC: dict[str, Any] = {"n_examples": 100, "batch_size": 50, "seed": 0,
                             "attacks": [{"name": "pgd", "eps": [0.1], "steps": 10, "alpha_ratio": 0.25}],
                             "checks": {"large_eps": None, "convergence": False}, "member_transfer": None}


def startup_figures(t_first_epoch_s: float, first_epoch_steps_s: float, total_s: float) -> dict[str, float]:
    """Time to the first step (the first epoch's end minus its steps) and its share of the whole job."""
    if total_s <= 0 or t_first_epoch_s > total_s + 1e-9 or first_epoch_steps_s > t_first_epoch_s:
        raise ValueError(f"inconsistent timings: first epoch at {t_first_epoch_s}, its steps {first_epoch_steps_s}, "
                         f"total {total_s}")
    to_first_step = t_first_epoch_s - first_epoch_steps_s
    return {"to_first_step_s": to_first_step, "startup_share": to_first_step / total_s}


def _bare_loop(config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ensemble_core.training import TrainHooks, train_ensemble

    torch.set_num_threads(config["threads"])
    seen: list[tuple[float, float]] = []  # (wall clock at the epoch's end, its step time)

    def on_epoch_end(metrics: dict[str, Any], state: Any) -> None:
        seen.append((time.time(), float(metrics["epoch_time_s"])))

    train_ensemble(config["spec"], device=torch.device("cpu"), hooks=TrainHooks(on_epoch_end=on_epoch_end,
                                                                                 log=lambda line: None))
    return {"first_epoch_wall": seen[0][0], "first_epoch_steps_s": seen[0][1]}  # rank 0: result.return_value


def bare(spec: dict[str, Any]) -> dict[str, Any]:
    """A bare TorchTrainer.fit() of the same spec: wall times from just before the trainer is built."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.ray_common import cpus_per_worker, torch_threads_for

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cpus = cpus_per_worker()
    storage = tempfile.mkdtemp(prefix="re-bench-bare-")
    t0 = time.time()
    trainer = TorchTrainer(
        _bare_loop, train_loop_config={"spec": spec, "threads": torch_threads_for(cpus)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="bench-bare", storage_path=storage))
    try:
        result = trainer.fit()
        total = time.time() - t0
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if result.error is not None:
        raise result.error
    m = result.return_value
    return {"path": "bare TorchTrainer.fit()", "first_epoch_seen_s": m["first_epoch_wall"] - t0,
            "first_epoch_steps_s": m["first_epoch_steps_s"], "total_s": total,
            **startup_figures(m["first_epoch_wall"] - t0, m["first_epoch_steps_s"], total)}


def service(spec: dict[str, Any], url: str, data_dir: Path, *, warm: bool = False, warm_ddp: bool = False,
            jobs: list[tuple[str, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """POST the jobs to the real API with a real worker; poll until epoch 1 is visible and until each ends.

    Cold: ``jobs`` (label, spec) one after the other on Ray Train (default: one job of ``spec``). Warm: two jobs
    of ``spec`` in a row with ``RE_WARM_TRAIN=1``, then two evaluate jobs. One row per job."""
    from fastapi.testclient import TestClient

    from service import migrate
    from service.app import create_app
    from service.settings import Settings
    from workers.warm import release_idle
    from workers.worker import Worker

    migrate.upgrade(url)
    settings = Settings(data_dir=data_dir, database_url=url)
    app = create_app(settings, warm=False)
    worker = Worker(settings)
    old_env, old_ddp = os.environ.get("RE_WARM_TRAIN"), os.environ.get("RE_WARM_DDP")
    os.environ["RE_WARM_TRAIN"] = "1" if warm else "0"
    os.environ["RE_WARM_DDP"] = "1" if warm_ddp else "0"
    thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
    thread.start()
    if warm:
        jobs = [("service warm, new actor", spec), ("service warm, reused actor", spec)]
    jobs = jobs or [("service POST /v1/jobs", spec)]
    rows = []
    try:
        with TestClient(app) as client:
            for label, job_spec in jobs:
                jid, first, total = submit_and_time(client, "train", job_spec,
                                                    lambda job: (job.get("epoch") or 0) >= 1, timeout=900)
                items = client.get(f"/v1/jobs/{jid}/metrics", params={"name": "epoch_time_s"}).json()["items"]
                steps_s = next(float(p["value"]) for p in items if int(p["step"]) == 1)
                results = client.get(f"/v1/jobs/{jid}/results").json().get("results") or {}
                rows.append({"path": label, "first_epoch_seen_s": first, "first_epoch_steps_s": steps_s,
                             "total_s": total, **startup_figures(first, steps_s, total),
                             "startup_s": results.get("startup_s") or {}})
                target = jid
            if warm:
                for label in ("evaluate job, first in this worker process", "evaluate job, next"):
                    rows.append(evaluate_row(client, label, {**EVAL_SPEC, "target_job": target}))
    finally:
        worker.stop()
        thread.join(60)
        release_idle()
        for name, old in (("RE_WARM_TRAIN", old_env), ("RE_WARM_DDP", old_ddp)):
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return rows


def startup_table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per train job: its start-up seconds per phase (``startup_s``), in the phases' order; the
    columns are every phase any row has (a row without one shows nothing there)."""
    from workers.startup import PHASES

    order = {name: i for i, name in enumerate(["prepare", *PHASES.values()])}
    names: list[str] = []
    for r in rows:
        for k in r.get("startup_s") or {}:
            if k != "total" and k not in names:
                names.append(k)
    names.sort(key=lambda k: order.get(k.split("..")[0], 99))
    out = [{"path": r["path"], **{k: round(v, 2) for k, v in (r.get("startup_s") or {}).items()}}
           for r in rows if r.get("startup_s")]
    return out, ["path", *names, "total"]


def submit_and_time(client: Any, kind: str, spec: dict[str, Any], first_seen: Callable[[dict[str, Any]], bool],
                    timeout: float) -> tuple[str, float, float]:
    """POST a job to an idle, listening worker; poll ``GET /v1/jobs/{id}`` every 50 ms. Returns the job id, the
    seconds from the POST until ``first_seen(job)`` held and until the job succeeded (anything else raises)."""
    time.sleep(1.0)  # the worker is idle and listening, as in a running deployment
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", json={"kind": kind, "spec": spec})
    r.raise_for_status()
    jid = r.json()["id"]
    first = None
    while True:
        job = client.get(f"/v1/jobs/{jid}").json()
        now = time.perf_counter() - t0
        if first is None and first_seen(job):
            first = now
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        if now > timeout:
            raise TimeoutError(f"{kind} job {jid} not done after {timeout:.0f} s: {job}")
        time.sleep(0.05)
    if job["status"] != "succeeded" or first is None:
        raise RuntimeError(f"{kind} job ended {job['status']} (first seen: {first}): {job.get('error')}")
    return jid, first, now


def evaluate_row(client: Any, label: str, spec: dict[str, Any]) -> dict[str, Any]:
    """POST one evaluate job; the seconds to its first attacked batch (``stage`` of a white-box unit) and to
    its end, and that batch's own attack time (the unit's time over its batches, from the job's results)."""
    jid, first, now = submit_and_time(client, "evaluate", spec,
                                      lambda job: str(job.get("stage") or "").startswith("wb|"), timeout=600)
    timings = client.get(f"/v1/jobs/{jid}/results").json()["timings_s"]
    n_batches = -(-spec["n_examples"] // spec["batch_size"])
    batch_s = sum(v for k, v in timings.items() if k.startswith("wb|")) / n_batches
    return {"path": label, "first_attacked_batch_s": first, "batch_attack_s": batch_s,
            "before_first_batch_s": first - batch_s, "total_s": now}


def run(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    from ensemble_core.datacache import CACHE_ENV

    load0 = os.getloadavg()[0]
    spec = dict(spec or SPEC)
    ddp_spec = {**spec, "workers": 2}
    data_dir = Path(tempfile.mkdtemp(prefix="re-bench-svc-"))
    old_cache = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(data_dir / "dataset-cache")  # empty; Ray's processes inherit it
    try:
        with private_ray(num_cpus=2), embedded_postgres() as url:
            ddp_rows = service(spec, url, data_dir, jobs=[
                ("DDP 2 workers, data cache empty", ddp_spec), ("DDP 2 workers, data cache filled", ddp_spec)])
            group_rows = service(spec, url, data_dir, warm_ddp=True, jobs=[
                ("DDP 2 workers, warm group, new", ddp_spec), ("DDP 2 workers, warm group, reused", ddp_spec)])
            svc, = service(spec, url, data_dir)
            bare_row = bare(spec)
            warm_rows = service(spec, url, data_dir, warm=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if old_cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old_cache
    ratio = svc["to_first_step_s"] / bare_row["to_first_step_s"]
    print(header(f"service overhead: POST /v1/jobs -> first step vs bare TorchTrainer.fit() -> first step "
                 f"({spec['members']} x {spec['architecture']}, {spec['epochs']} epochs of "
                 f"{spec['train_subset'] // spec['batch_size']} steps, 1 Ray Train worker; DDP rows: 2 workers)",
                 load0))
    eval_rows = [r for r in warm_rows if "first_attacked_batch_s" in r]
    warm_rows = [r for r in warm_rows if "first_attacked_batch_s" not in r]
    rows = [svc, bare_row, *warm_rows, *ddp_rows, *group_rows]
    print(table(rows, ["path", "first_epoch_seen_s", "first_epoch_steps_s", "to_first_step_s", "total_s",
                       "startup_share"]))
    breakdown_rows, columns = startup_table(rows)
    print("start-up per phase, seconds from the job worker's call to the first step (workers/startup.py):")
    print(table(breakdown_rows, columns))
    print(table(eval_rows, ["path", "first_attacked_batch_s", "batch_attack_s", "before_first_batch_s", "total_s"]))
    warm_ratio = warm_rows[1]["to_first_step_s"] / svc["to_first_step_s"]
    ddp_ratio = ddp_rows[1]["to_first_step_s"] / ddp_rows[0]["to_first_step_s"]
    group_ratio = group_rows[1]["to_first_step_s"] / ddp_rows[0]["to_first_step_s"]
    group_vs_filled = group_rows[1]["to_first_step_s"] / ddp_rows[1]["to_first_step_s"]
    print(f"time to first step, service / bare: {ratio:.3f}; start-up share of the small job: service "
          f"{svc['startup_share']:.1%}, bare {bare_row['startup_share']:.1%}")
    print(f"time to first step, warm (reused actor) / cold service: {warm_ratio:.3f} "
          f"({warm_rows[1]['to_first_step_s']:.1f} s; target: within 5 s)")
    print(f"DDP time to first step, data cache filled / empty: {ddp_ratio:.3f} ({ddp_rows[1]['to_first_step_s']:.1f} "
          f"against {ddp_rows[0]['to_first_step_s']:.1f} s)")
    print(f"DDP time to first step, warm group (reused; RE_WARM_DDP=1) / cold path with the data cache empty: "
          f"{group_ratio:.3f} ({group_rows[1]['to_first_step_s']:.1f} against {ddp_rows[0]['to_first_step_s']:.1f} s; "
          f"target: at most 0.5); / cold path with the cache filled: {group_vs_filled:.3f}")
    print(f"evaluate job, POST -> first attacked batch: {eval_rows[1]['first_attacked_batch_s']:.1f} s on a worker "
          f"that has run one before ({eval_rows[0]['first_attacked_batch_s']:.1f} s for its first); target: within "
          f"3 s")
    result = {"spec": spec, "rows": rows, "evaluate_spec": EVAL_SPEC, "evaluate_rows": eval_rows,
              "ratio_service_over_bare": ratio, "ratio_warm_over_cold": warm_ratio,
              "ratio_ddp_cache_filled_over_empty": ddp_ratio, "ratio_ddp_warm_group_over_cold": group_ratio,
              "ratio_ddp_warm_group_over_cold_cache_filled": group_vs_filled}
    save("service-overhead", result, load0)
    return result
