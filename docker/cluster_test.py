"""``make cluster-test``: the compose cluster built from this checkout and run for real, jobs over the published API.

What it does, in order (each phase timed; the record goes to ``runs/cluster/cluster-test.json``):

1. starts ``dockerd`` if no Docker engine answers (root only);
2. base images: ``docker/base-images.sh`` (Debian, Python 3.11, PostgreSQL 15 from Debian packages) unless
   ``RE_CLUSTER_BASES=public`` asks for the public ``python:3.11-slim-bookworm`` and ``postgres:15``;
3. the project image ``robust-ensembles:cpu`` from ``docker/Dockerfile``, its Python packages from a wheel
   directory that the host's own pip fills (``pip download``, which finds whatever the host's pip finds) and
   that is served on 127.0.0.1 for the build (``--network host``, ``PIP_EXTRA_ARGS``): nothing of the host's
   configuration goes into the image;
4. the cluster under its own project name (``re-cluster-test``) with fresh secrets: PostgreSQL, migrations,
   the API (published on 127.0.0.1 only; checked), a Ray head, **two Ray CPU worker nodes of one CPU each**
   (so a 2-worker DDP run needs both), the job worker (a Ray node with no CPUs);
5. a token from ``docker-compose exec api robust-ensembles token create``; then over the published port:
   a 2-worker DDP train job and an evaluate job that names it (it waits for the train job);
6. once the train job has logged an epoch, SIGKILLs one Ray worker node's container and starts it again;
7. checks: the train job's ranks ran on the two Ray worker nodes (its log names each rank's host); it
   succeeded, entering ``succeeded`` exactly once; the evaluate job succeeded; no Ray node's object store
   fell back to /tmp; ``ensemble.pt`` downloaded over the API loads here and gives the clean accuracy the
   job reported;
8. tears the cluster down with its volumes (``RE_CLUSTER_KEEP=1`` keeps it for inspection).

It prints each job's final state and exits non-zero on the first failed check. The base images and Docker's
layer cache are kept between runs (a second run rebuilds only what changed).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "cluster"
PROJECT = os.environ.get("RE_CLUSTER_PROJECT", "re-cluster-test")
IMAGE = "robust-ensembles:cpu"
WHEELS_PORT = int(os.environ.get("RE_CLUSTER_WHEELS_PORT", 8999))
EXCLUDED = ("torch==", "pytest", "ruff", "playwright", "tensorboard", "schemathesis")  # as docker/Dockerfile
TRAIN = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 2, "epochs": 5,
         "batch_size": 128, "train_subset": 6000, "eval_subset": 500, "workers": 2, "seed": 0}
EVALUATE = {"n_examples": 100, "split": "report", "seed": 0, "member_transfer": None,
            "attacks": [{"name": "pgd", "eps": [0.1], "steps": 10, "restarts": 1}]}
PHASES: dict[str, float] = {}


class CheckFailed(RuntimeError):
    """A check of the cluster test did not hold."""


def say(msg: str) -> None:
    print(f"[cluster-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def phase(name: str):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    say(f"{name} ...")
    yield
    PHASES[name] = round(time.monotonic() - t0, 1)
    say(f"{name}: {PHASES[name]} s")


def sh(*args: str, check: bool = True, capture: bool = False, env: dict[str, str] | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, check=check, text=True, timeout=timeout, env=env,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)


def logged(name: str, *args: str) -> None:
    """Runs a long, chatty command (pip download, docker build) into ``runs/cluster/<name>.log``; its tail
    is printed when it fails."""
    path = OUT / f"{name}.log"
    with open(path, "w") as log:
        rc = subprocess.run(list(args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True).returncode
    if rc != 0:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
        raise CheckFailed(f"{name} failed (exit {rc}; {path}):\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ images
def ensure_dockerd() -> None:
    if sh("docker", "info", check=False, capture=True).returncode == 0:
        return
    if os.geteuid() != 0:
        raise CheckFailed("no Docker engine answers and this is not root: start dockerd first")
    OUT.mkdir(parents=True, exist_ok=True)
    say("starting dockerd")
    with open(OUT / "dockerd.log", "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    for _ in range(120):
        if sh("docker", "info", check=False, capture=True).returncode == 0:
            return
        time.sleep(0.5)
    raise CheckFailed(f"dockerd did not answer within 60 s (log: {OUT / 'dockerd.log'})")


def base_images() -> dict[str, str]:
    if os.environ.get("RE_CLUSTER_BASES") == "public":
        return {"PYTHON_IMAGE": "python:3.11-slim-bookworm", "POSTGRES_IMAGE": "postgres:15"}
    out = sh("docker/base-images.sh", capture=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line and "IMAGE" in line)


def wheel_dir() -> Path:
    """The image's Python packages, fetched by the host's pip (its indexes and find-links)."""
    wheels = OUT / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    runtime = OUT / "runtime-requirements.txt"
    lines = [x for x in (ROOT / "requirements.txt").read_text().splitlines() if not x.startswith(EXCLUDED)]
    torch_pin = next(x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("torch=="))
    runtime.write_text("\n".join([*lines, torch_pin, "setuptools>=68", "wheel"]) + "\n")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(wheels)]
    logged("pip-download", *pip, "-r", str(runtime))
    logged("pip-download-nodeps", *pip, "--no-deps", "-r", str(ROOT / "requirements-nodeps.txt"))
    return wheels


@contextlib.contextmanager
def served(directory: Path):  # type: ignore[no-untyped-def]
    """The directory's listing on 127.0.0.1 (pip reads it as --find-links)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    # a fixed port when free: the URL is part of a build argument, and a new one would void Docker's layer cache
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def build_image(bases: dict[str, str]) -> None:
    wheels = wheel_dir()
    with served(wheels) as url:
        logged("docker-build", "docker", "build", "--network", "host", "-f", "docker/Dockerfile",
           "--build-arg", f"PYTHON_IMAGE={bases['PYTHON_IMAGE']}",
           "--build-arg", f"PIP_EXTRA_ARGS=--no-index --find-links {url}",
           "-t", IMAGE, ".")


# ------------------------------------------------------------------------------------------------ cluster
class Cluster:
    def __init__(self, bases: dict[str, str]) -> None:
        self.port = free_port()
        self.env_file = OUT / "cluster.env"
        values = {"POSTGRES_USER": "robust", "POSTGRES_PASSWORD": secrets.token_hex(16),
                  "POSTGRES_DB": "robust_ensembles", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                  "API_PORT": str(self.port), "API_BIND": "127.0.0.1", "RAY_CPU_WORKERS": "2",
                  "RAY_WORKER_CPUS": "1", "RAY_OBJECT_STORE_BYTES": "500000000", "RE_AUTH": "1", **bases}
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.env_file.chmod(0o600)
        self.base = f"http://127.0.0.1:{self.port}"
        self.headers: dict[str, str] = {}

    def compose(self, *args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("docker-compose", "-p", PROJECT, "--env-file", str(self.env_file), *args, capture=capture,
                  check=check)

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", "--scale", "ray-worker=2")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/healthz", timeout=3).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise CheckFailed("the API did not answer /healthz within 300 s")
        binding = self.compose("port", "api", "8000", capture=True).stdout.strip()
        if not binding.startswith("127.0.0.1:"):
            raise CheckFailed(f"the API port is published on {binding}, not on loopback only")
        token = json.loads(self.compose("exec", "-T", "api", "robust-ensembles", "token", "create", "--owner",
                                        "cluster-test", "--json", capture=True).stdout)["token"]
        self.headers = {"Authorization": f"Bearer {token}"}
        if httpx.get(f"{self.base}/v1/jobs", timeout=10).status_code != 401:
            raise CheckFailed("the API answered /v1/jobs without a token")

    def ray_nodes_warnings(self) -> list[str]:
        """Ray's warning that a node's object store fell back to /tmp (its /dev/shm too small), from every
        container that runs a Ray node."""
        out = self.compose("logs", "--no-color", "ray-head", "ray-worker", "worker", capture=True).stdout
        return [x.strip() for x in out.splitlines() if "/dev/shm" in x and "/tmp" in x]

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", check=False)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, capture=True).stdout.split()

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = httpx.request(method, f"{self.base}{path}", headers=self.headers, timeout=30, **kw)
        if r.status_code >= 400:
            raise CheckFailed(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r

    def submit(self, kind: str, spec: dict[str, Any]) -> str:
        return str(self.api("POST", "/v1/jobs", json={"kind": kind, "spec": spec}).json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, until: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            if job["status"] in ("failed", "cancelled"):
                raise CheckFailed(f"job {job_id} {job['status']}: {job.get('error')}")
            time.sleep(1)
        raise CheckFailed(f"job {job_id}: not {what} within {timeout:.0f} s (last: {self.job(job_id)['status']})")

    def logs(self, job_id: str) -> list[str]:
        lines: list[str] = []
        after = 0
        while True:
            page = self.api("GET", f"/v1/jobs/{job_id}/logs", params={"after": after}).json()
            lines += [item["line"] for item in page["items"]]
            if not page["items"]:
                return lines
            after = page["next_after"]


# ------------------------------------------------------------------------------------------------ the run
def run() -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "phases": PHASES}
    with phase("docker engine"):
        ensure_dockerd()
    with phase("base images"):
        bases = base_images()
    with phase("project image"):
        build_image(bases)
    record["image_bytes"] = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", IMAGE, capture=True).stdout)
    cluster = Cluster(bases)
    cluster.down()  # a cluster left over from an interrupted run
    try:
        with phase("cluster up"):
            cluster.up()
        workers = cluster.containers("ray-worker")
        if len(workers) != 2:
            raise CheckFailed(f"expected 2 Ray worker node containers, found {len(workers)}")
        hosts = {c: sh("docker", "inspect", "-f", "{{.Config.Hostname}}", c, capture=True).stdout.strip()
                 for c in workers}
        with phase("train job, a Ray node killed mid-training"):
            train = cluster.submit("train", TRAIN)
            evaluate = cluster.submit("evaluate", {**EVALUATE, "target_job": train})
            cluster.wait(train, lambda j: j["status"] == "running" and (j.get("epoch") or 0) >= 1, 600,
                         "past its first epoch")
            victim = workers[1]
            sh("docker", "kill", victim)
            killed_at = time.monotonic()
            time.sleep(5)
            sh("docker", "start", victim)
            say(f"killed the Ray worker node {hosts[victim]} mid-training and started it again")
            job = cluster.wait(train, lambda j: j["status"] == "succeeded", 900, "succeeded")
            record["train_after_kill_s"] = round(time.monotonic() - killed_at, 1)
        with phase("evaluate job"):
            ev = cluster.wait(evaluate, lambda j: j["status"] == "succeeded", 900, "succeeded")
        record["jobs"] = {"train": {k: job[k] for k in ("id", "status", "attempts", "infra_failures")},
                          "evaluate": {k: ev[k] for k in ("id", "status", "attempts", "infra_failures")}}
        for name, j in (("train", job), ("evaluate", ev)):
            say(f"{name} job {j['id']}: {j['status']}, attempts {j['attempts']}, "
                f"infrastructure failures {j['infra_failures']}")
        check_train(cluster, train, hosts, record)
        shm = cluster.ray_nodes_warnings()
        record["object_store_warnings"] = shm
        if shm:
            raise CheckFailed(f"a Ray node's object store fell back to /tmp: {shm[0]}")
        check_checkpoint(cluster, train, record)
    finally:
        if os.environ.get("RE_CLUSTER_KEEP") != "1":
            with phase("tear down"):
                cluster.down()
    return record


def check_train(cluster: Cluster, train: str, hosts: dict[str, str], record: dict[str, Any]) -> None:
    events = cluster.api("GET", f"/v1/jobs/{train}/events").json()
    entered = [e for e in events if e["to_status"] == "succeeded"]
    if len(entered) != 1:
        raise CheckFailed(f"the train job entered succeeded {len(entered)} times")
    lines = cluster.logs(train)
    placed = sorted({line.split(" on host ")[1].split(",")[0] for line in lines if " on host " in line})
    record["rank_hosts"] = placed
    if not set(hosts.values()) <= set(placed):
        raise CheckFailed(f"the 2-worker run's ranks ran on {placed}, not on both Ray worker nodes "
                          f"{sorted(hosts.values())}")
    record["restarts_logged"] = [x for x in lines if "restart" in x.lower() or "resum" in x.lower()][:10]


def check_checkpoint(cluster: Cluster, train: str, record: dict[str, Any]) -> None:
    import torch

    from ensemble_core.checkpoint import load_ensemble
    from ensemble_core.data import load_dataset, test_subset
    from ensemble_core.training import clean_accuracy

    path = OUT / "ensemble.pt"
    path.write_bytes(cluster.api("GET", f"/v1/jobs/{train}/artifacts/ensemble.pt").content)
    torch.set_num_threads(1)
    reported = cluster.api("GET", f"/v1/jobs/{train}/results").json()["metrics"]["test_clean_acc"]
    test = test_subset(load_dataset("mnist", "test"), "report", n=TRAIN["eval_subset"])
    acc = clean_accuracy(load_ensemble(path), test)["acc"]
    record["checkpoint"] = {"bytes": path.stat().st_size, "clean_acc_here": acc, "clean_acc_reported": reported}
    say(f"ensemble.pt ({path.stat().st_size} bytes) loads; clean accuracy here {acc}, reported {reported}")
    if acc != reported:
        raise CheckFailed(f"ensemble.pt gives clean accuracy {acc}, the job reported {reported}")


def main() -> int:
    if not shutil.which("docker-compose"):
        print("docker-compose is missing (make install installs Debian's docker-compose)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        record = run()
    except (CheckFailed, subprocess.CalledProcessError) as e:
        say(f"FAILED: {e}")
        return 1
    record["wall_s"] = round(time.monotonic() - t0, 1)
    (OUT / "cluster-test.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"passed in {record['wall_s']} s: {json.dumps(PHASES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
