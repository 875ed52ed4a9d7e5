"""``robust-ensembles demo``: the whole service end to end on one machine, over REST.

Starts ``robust-ensembles up`` (embedded Postgres, migrations, local Ray, API, one worker) as a
subprocess (the entry point's program: :attr:`service.cli.EntryPoint.program`), submits a train job
(3-member baseline LeNet-5 on MNIST, DDP over Ray Train workers) and an evaluate job that depends on it
(clean accuracy and PGD at eps 0.1 / 0.2 / 0.3), follows both with progress bars, prints the results
tables and stops the service.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.settings import Settings

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_train_spec(*, epochs: int, train_subset: int, workers: int) -> dict[str, Any]:
    return {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 3, "epochs": epochs,
            "batch_size": 128, "train_subset": train_subset, "workers": workers, "seed": 0}


def demo_evaluate_spec(train_job_id: str, *, n_examples: int) -> dict[str, Any]:
    return {"target_job": train_job_id, "n_examples": n_examples, "split": "report", "seed": 0,
            "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 20, "restarts": 1}],
            "member_transfer": None}


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_service(settings: Settings, port: int, program: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """``program up`` on ``port`` (``program``: the command line of ``robust-ensembles``)."""
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "up.log"
    cmd = [*program, "up", "--port", str(port), "--data-dir", str(settings.data_dir)]
    if settings.database_url:
        cmd += ["--database-url", settings.database_url]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "RE_AUTH": "0"}  # the demo is the local single-user mode: its service listens on 127.0.0.1 only
    with open(log_path, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return proc, log_path


def stop_service(proc: subprocess.Popen[bytes], timeout: float = 150.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_ready(client: Any, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = READY_TIMEOUT_S) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}; last lines of {log_path}:\n"
                               + _tail(log_path))
        if client.ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s; see {log_path}")


def run_demo(settings: Settings, *, program: Sequence[str], port: int = 0, epochs: int = 2,
             train_subset: int = 10_000, workers: int = 2, n_examples: int = 300, keep_running: bool = False) -> int:
    from service.cli_common import watch_job
    from service.client import Client
    from service.report import format_results

    port = port or free_port()
    api = f"http://127.0.0.1:{port}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"robust-ensembles demo: starting the service (data in {settings.data_dir}, API {api})", flush=True)
    t0 = time.monotonic()
    proc, log_path = start_service(settings, port, program)
    code = 1
    try:
        with Client(api) as c:
            wait_ready(c, proc, log_path)
            print(f"service ready in {time.monotonic() - t0:.1f} s (log: {log_path}; worker log: "
                  f"{settings.data_dir / 'logs' / 'worker.log'})", flush=True)
            train = c.submit("train", demo_train_spec(epochs=epochs, train_subset=train_subset, workers=workers))
            print(f"POST /v1/jobs train -> {train['id']} ({train['status']}): 3 x lenet5 baseline on MNIST, "
                  f"{epochs} epochs on {train_subset} images, {workers} Ray Train workers (DDP, gloo)", flush=True)
            ev = c.submit("evaluate", demo_evaluate_spec(train["id"], n_examples=n_examples))
            print(f"POST /v1/jobs evaluate -> {ev['id']} ({ev['status']}), depends on {ev['depends_on']}: "
                  f"clean + PGD-20 at eps 0.1/0.2/0.3 on {n_examples} test images", flush=True)
            ok_train = watch_job(c, train["id"]) == 0
            ok_eval = watch_job(c, ev["id"]) == 0
            print()
            if ok_train:
                print(format_results(c.job(train["id"]), c.results(train["id"])))
                print()
            if ok_eval:
                print(format_results(c.job(ev["id"]), c.results(ev["id"])))
                print()
            for job_id in (train["id"], ev["id"]):
                names = ", ".join(a["name"] for a in c.artifacts(job_id)["items"])
                print(f"artifacts of {job_id}: {names or '(none)'}")
            print(f"download the ensemble: robust-ensembles artifacts {train['id']} --download ensemble.pt "
                  f"--api {api}")
            print(f"total demo time {time.monotonic() - t0:.0f} s")
            code = 0 if ok_train and ok_eval else 1
    except KeyboardInterrupt:
        print("interrupted")
        code = 130
    except Exception as e:
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        if keep_running and proc.poll() is None:
            print(f"the service keeps running at {api} (pid {proc.pid}); stop it with: kill {proc.pid}")
        else:
            print("stopping the service ...", flush=True)
            stop_service(proc)
            print(f"service stopped (exit code {proc.returncode})")
    return code
