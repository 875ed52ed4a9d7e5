"""Every command of README.md's "Using the service" section, run for real, as the README prints it.

The commands are parsed from README.md (its ``bash`` and ``python`` blocks, and the inline
``robust-ensembles train-local`` / ``robust-ensembles token create`` commands), so a README edit that
breaks a command breaks this test; a new command this test does not know fails it too.

Setting: ``.venv/bin/robust-ensembles up`` runs as a subprocess on a free port with all its state in a
temporary directory (``RE_DATA_DIR``): an embedded PostgreSQL, the migrations, a local Ray, the API and
one worker. The client commands run as subprocesses of the venv's ``robust-ensembles`` with ``RE_API_URL``
pointing at that port (the README's "in another shell, source .venv/bin/activate"); ``<job-id>`` is the
id printed by the last ``submit train``; ``curl`` runs with the README's port replaced. The README's budgets
are small on purpose (PDD, 1 epoch on 2,000 MNIST images; PGD on 200 test images), so the numbers checked
here are "well above chance", not the method's accuracy. The ``curl`` example is sent while the worker
runs the evaluate job, and its job is checked and cancelled while it waits in the queue (its own Ray
Train run would add half a minute). The service is stopped with SIGTERM (``up`` then stops
its worker, Ray and PostgreSQL) and, failing that, killed by process group; never with ``ray stop``.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent  # the "source .venv/bin/activate" of the README
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
README_PORT = "8000"
READY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
MIN_ACC = 0.3  # chance is 0.1; the README's budgets reach ~0.6-0.8 clean accuracy


# ------------------------------------------------------------------------------------------ README parsing
def readme_section(heading: str, text: str | None = None) -> str:
    """The text under ``## heading`` up to the next level-2 heading (subsections included)."""
    text = README.read_text() if text is None else text
    m = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


def fenced_blocks(section: str, lang: str) -> list[str]:
    """The contents of the ```lang blocks of a section, in order."""
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```", section, re.M | re.S)


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a bash block as argv lists (comments dropped; a quote left open continues a command)."""
    commands: list[list[str]] = []
    pending = ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        if argv:
            commands.append(argv)
        pending = ""
    assert not pending.strip(), f"unterminated command in a README block: {pending!r}"
    return commands


def inline_command(section: str, prefix: str) -> list[str]:
    """The one inline code span of a section that starts with ``prefix``, as argv."""
    spans = [s for s in re.findall(r"`([^`\n]+)`", section) if s.startswith(prefix)]
    assert len(spans) == 1, f"expected one `{prefix}...` in the README section, found {spans}"
    return shlex.split(spans[0])


def snippet_spec(snippet: str) -> dict[str, Any]:
    """The first dict literal of the README's Python snippet (the spec it trains)."""
    for node in ast.walk(ast.parse(snippet)):
        if isinstance(node, ast.Dict):
            value = ast.literal_eval(node)
            assert isinstance(value, dict)
            return value
    raise AssertionError("the README's Python snippet has no spec dict")


def test_readme_parsing_finds_every_command() -> None:
    """The parser sees the commands this file runs (a README restructuring must not make them vanish)."""
    section = readme_section("Using the service")
    cmds = [c for b in fenced_blocks(section, "bash") for c in shell_commands(b)]
    names = [c[0].rsplit("/", 1)[-1] + " " + c[1] if c[0].endswith("robust-ensembles") else c[0] for c in cmds]
    assert names[0] == "robust-ensembles up" and "curl" in names, names
    assert {"robust-ensembles methods", "robust-ensembles attacks", "robust-ensembles submit",
            "robust-ensembles status", "robust-ensembles results", "robust-ensembles artifacts"} <= set(names), names
    assert len(fenced_blocks(section, "python")) == 1
    assert inline_command(section, "robust-ensembles train-local")[1] == "train-local"
    assert inline_command(section, "robust-ensembles token create") == [
        "robust-ensembles", "token", "create", "--owner", "you"]
    # the Quick start's lines stay as `make demo` runs them in CI
    quick = fenced_blocks(readme_section("Quick start"), "bash")[0]
    assert [c[:2] for c in shell_commands(quick)] == [["make", "demo"], ["make", "test"]]
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    for block in fenced_blocks(README.read_text(), "bash"):
        for c in shell_commands(block):
            if c[0] == "make":
                assert c[1] in targets, f"README runs `make {c[1]}`, which the Makefile does not define"


# ------------------------------------------------------------------------------------------ the running service
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} not readable)"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Service:
    """``robust-ensembles up`` as started from the README, and what the client commands need."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    work_dir: Path
    log_path: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def diagnostics(self) -> str:
        return (f"\n--- up log ({self.log_path}):\n{_tail(self.log_path)}\n--- worker log:\n"
                f"{_tail(self.data_dir / 'logs' / 'worker.log')}")

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start one README command (``robust-ensembles`` from the venv, like an activated shell)."""
        return subprocess.Popen(argv, cwd=self.work_dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)

    def finish(self, argv: list[str], proc: subprocess.Popen[str], timeout: float = 60.0,
               t0: float | None = None) -> subprocess.CompletedProcess[str]:
        """Wait for a started command; it must exit 0. Prints its wall time (see ``pytest -s``)."""
        t0 = time.monotonic() if t0 is None else t0
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"`{shlex.join(argv)}` still running after {timeout:.0f} s\n{stdout}\n{stderr}"
                                 f"{self.diagnostics()}") from None
        print(f"{time.monotonic() - t0:6.1f} s  {shlex.join(argv)[:100]}", flush=True)
        self.outputs.append(f"$ {shlex.join(argv)}\n{stdout}{stderr}")
        assert proc.returncode == 0, (f"`{shlex.join(argv)}` exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n"
                                      f"{stderr}{self.diagnostics()}")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def run(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one README command to completion; it must exit 0."""
        t0 = time.monotonic()
        return self.finish(argv, self.start(argv), timeout, t0)

    def jobs(self, **params: str) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.api}/v1/jobs", params=params, timeout=10).json()["items"])


def _clean_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RE_") and k != "DATABASE_URL"}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RE_DATA_DIR=str(data_dir), RE_API_URL=f"http://127.0.0.1:{port}", PYTHONUNBUFFERED="1",
               OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"))
    return env


def _stop(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    """SIGTERM ``up`` (it stops its worker, Ray and PostgreSQL); kill by process group what is left."""
    worker_pids = _children(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # anything left in up's own process group
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the worker (own session) stops itself when its parent is gone
    for pid in worker_pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
    pidfile = data_dir / "pg" / "postmaster.pid"  # the embedded PostgreSQL, if up could not stop it
    with contextlib.suppress(OSError, ValueError, IndexError):
        pg_pid = int(pidfile.read_text().splitlines()[0])
        if _alive(pg_pid):
            os.kill(pg_pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            for _ in range(60):
                if not _alive(pg_pid):
                    break
                time.sleep(0.5)


@pytest.fixture()
def service() -> Iterator[Service]:
    """The README's ``up`` command on a free port, state in a short temp dir (Ray's socket paths stay short)."""
    [up] = fenced_blocks(readme_section("Using the service"), "bash")[0:1]
    [argv] = shell_commands(up)
    assert argv[:2] == [".venv/bin/robust-ensembles", "up"] and "--port" in argv, argv
    i = argv.index("--port") + 1
    assert argv[i] == README_PORT, argv
    port = _free_port()
    argv = [str(VENV_BIN / "robust-ensembles"), *argv[1:i], str(port), *argv[i + 1:]]
    data_dir = Path(tempfile.mkdtemp(prefix="re-readme-"))
    work_dir = data_dir / "work"  # the "other shell"'s directory: downloads and runs/ land here
    work_dir.mkdir()
    env = _clean_env(data_dir, port)
    log_path = data_dir / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    svc = Service(proc, port, data_dir, work_dir, log_path, env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"`up` exited with code {proc.returncode}{svc.diagnostics()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{svc.api}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"/healthz not up within {READY_TIMEOUT_S:.0f} s{svc.diagnostics()}"
            time.sleep(0.5)
        yield svc
    finally:
        _stop(proc, data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ checks per command
def _submitted_id(stdout: str) -> str:
    first = stdout.strip().splitlines()[0].strip()
    assert UUID_RE.match(first), f"`submit` did not print a job id first: {stdout[:500]}"
    return first


def _check_watch(stdout: str, job_id: str) -> None:
    assert f"job {job_id} succeeded" in stdout.strip().splitlines()[-1], stdout[-2000:]


def _wait_terminal(api: str, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout:.0f} s"
        time.sleep(0.5)


def _check_ensemble(path: Path, members: int) -> float:
    """Load a downloaded ensemble.pt and score it on 500 real MNIST test images."""
    from ensemble_core.checkpoint import load_ensemble
    from ensemble_core.data import TensorDataset, load_dataset
    from ensemble_core.ensemble import Ensemble
    from ensemble_core.training import clean_accuracy

    ens = load_ensemble(path)
    assert isinstance(ens, Ensemble) and len(ens) == members and not ens.training
    test = load_dataset("mnist", "test")
    acc = clean_accuracy(ens, TensorDataset(test.images[:500], test.labels[:500], test.info))["acc"]
    assert MIN_ACC < acc <= 1.0, acc
    return float(acc)


def _curl(argv: list[str], port: int) -> list[str]:
    """The README's curl command with its port replaced (and nothing else changed)."""
    urls = [i for i, a in enumerate(argv) if f"localhost:{README_PORT}/" in a]
    assert len(urls) == 1, argv
    out = list(argv)
    out[urls[0]] = out[urls[0]].replace(f"localhost:{README_PORT}", f"localhost:{port}")
    return out


def _curl_body(argv: list[str]) -> dict[str, Any]:
    body = json.loads(argv[argv.index("-d") + 1])
    assert isinstance(body, dict)
    return body


def test_using_the_service_commands(service: Service) -> None:
    """up, methods, submit train --watch, status, results, artifacts --download, submit evaluate --watch, curl,
    token create: each exits 0 and prints what the README says it does."""
    svc = service
    section = readme_section("Using the service")
    client_block, curl_block = fenced_blocks(section, "bash")[1:3]
    train_id: str | None = None
    eval_id: str | None = None
    eval_n = ""
    results_cmd: list[str] | None = None
    seen: list[str] = []

    for argv in shell_commands(client_block):
        assert argv[0] == "robust-ensembles", f"unexpected command in the README's client block: {argv}"
        sub = argv[1]
        seen.append(sub)
        if any("<job-id>" in a for a in argv):
            assert train_id, f"{shlex.join(argv)} needs a job id, but no `submit train` came before it"
            argv = [train_id if a == "<job-id>" else a.replace("=<job-id>", f"={train_id}") for a in argv]
        assert not any("<" in a for a in argv), f"unfilled placeholder in {argv}"

        if sub == "methods":
            out = svc.run(argv).stdout
            from ensemble_core.methods import method_names

            listed = re.findall(r"^(\w+):", out, re.M)
            assert set(method_names()) <= set(listed), (listed, method_names())
            assert re.search(r"^pdd:.*\n(?:  .*\n)*?    \w+ = ", out, re.M), "pdd's hyperparameters not listed"
        elif sub == "attacks":
            out = svc.run(argv).stdout
            from ensemble_core.attack_catalog import attack_names

            listed = re.findall(r"^(\w+) \(", out, re.M)
            assert listed == attack_names(), (listed, attack_names())
            assert re.search(r"^mora .*\n  losses: ce, cw, dlr\n", out, re.M), out
            assert re.search(r"^    steps = 40  \[>= 1, <= 10000\]", out, re.M), out
        elif sub == "submit" and argv[2] == "train":
            assert "--watch" in argv
            out = svc.run(argv, timeout=JOB_TIMEOUT_S).stdout
            train_id = _submitted_id(out)
            _check_watch(out, train_id)
        elif sub == "submit" and argv[2] == "evaluate":
            assert "--watch" in argv and f"target_job={train_id}" in argv
            eval_n = next((a.split("=", 1)[1] for a in argv if a.startswith("n_examples=")), "1000")
            t0 = time.monotonic()
            proc = svc.start(argv)
            # While the worker runs the evaluation, the REST example's job waits in the queue: it is checked
            # and cancelled there, which costs nothing (a Ray Train run of it would cost half a minute).
            deadline = time.monotonic() + 60
            while not svc.jobs(kind="evaluate", status="running") and proc.poll() is None:
                assert time.monotonic() < deadline, f"the evaluate job did not start{svc.diagnostics()}"
                time.sleep(0.3)
            rest_example(svc, curl_block)
            out = svc.finish(argv, proc, JOB_TIMEOUT_S, t0).stdout
            eval_id = _submitted_id(out)
            _check_watch(out, eval_id)
        elif sub == "status":
            out = svc.run(argv).stdout
            [line] = [ln for ln in out.splitlines() if train_id and ln.startswith(train_id)]
            assert " train " in line and " succeeded " in line and "epoch 1/1" in line, line
            assert re.search(r"^\(\d+ of \d+ jobs\)$", out, re.M), out
        elif sub == "results":
            results_cmd = argv
            out = svc.run(argv).stdout
            assert f"train job {train_id} (succeeded): pdd ensemble of 3 x lenet5 on mnist, 1 epochs" in out, out
            acc = float(re.search(r"^test_clean_acc\s+([0-9.]+)$", out, re.M).group(1))  # type: ignore[union-attr]
            assert MIN_ACC < acc <= 1.0, out
        elif sub == "artifacts":
            i = argv.index("--download") + 1
            out = svc.run(argv).stdout
            path = svc.work_dir / argv[i]
            assert f"{argv[i]} -> " in out and path.is_file(), out
            _check_ensemble(path, members=3)
        else:
            raise AssertionError(f"README command not exercised by this test: {shlex.join(argv)}")
    assert seen == ["methods", "attacks", "submit", "status", "results", "artifacts", "submit"], seen
    assert train_id and eval_id and results_cmd

    # `results <job-id>` for the evaluate job: the robustness table of the README's evaluation
    out = svc.run([eval_id if a == train_id else a for a in results_cmd]).stdout
    assert f"evaluate job {eval_id} (succeeded)" in out, out
    assert re.search(rf"^pgd-\d+ +target +{eval_n} +[0-9.]+ ", out, re.M), out  # the n column: n_examples

    # "Dashboard, tokens, TensorBoard": `robust-ensembles token create --owner you` (same data dir as `up`)
    token_cmd = inline_command(section, "robust-ensembles token create")
    r = svc.run(token_cmd)
    token = r.stdout.strip()
    assert re.fullmatch(r"re_\S{20,}", token), r.stdout
    assert "owner 'you'" in r.stderr, r.stderr
    listing = svc.run(["robust-ensembles", "token", "list"]).stdout
    [row] = [ln for ln in listing.splitlines() if " you " in ln]
    assert token.startswith(row.split()[1].removesuffix("...")) and "active" in row, listing
    # the train job's TensorBoard log is among its artifacts
    names = [a["name"] for a in httpx.get(f"{svc.api}/v1/jobs/{train_id}/artifacts", timeout=10).json()["items"]]
    assert any(n.startswith("tensorboard/") for n in names), names


def rest_example(svc: Service, curl_block: str) -> None:
    """The README's curl example, as printed (port replaced): the job is created with the sent spec, resolved.
    Then the README's claim that a bad value gets 422 naming the field and creates nothing."""
    [curl] = shell_commands(curl_block)
    assert curl[0] == "curl"
    before = httpx.get(f"{svc.api}/v1/jobs", timeout=10).json()["total"]
    r = svc.run(_curl(curl, svc.port))
    job = json.loads(r.stdout)
    sent = _curl_body(curl)
    assert UUID_RE.match(job["id"]) and job["kind"] == "train" and job["status"] in ("queued", "running"), job
    for key, value in sent["spec"].items():  # stored resolved: what was sent, plus every default filled in
        stored = job["spec"][key]
        if isinstance(value, dict):
            assert value.items() <= stored.items(), (key, stored, value)
        else:
            assert stored == value, (key, stored, value)
    assert job["spec"]["hyperparameters"], "the stored spec is not resolved (method defaults missing)"
    httpx.post(f"{svc.api}/v1/jobs/{job['id']}/cancel", timeout=10).raise_for_status()
    assert _wait_terminal(svc.api, job["id"], timeout=120)["status"] == "cancelled"
    # "A bad value gets HTTP 422 naming the field ... and creates nothing."
    bad = {**sent, "spec": {**sent["spec"], "members": 0}}
    r422 = httpx.post(f"{svc.api}/v1/jobs", json=bad, timeout=10)
    assert r422.status_code == 422 and "spec.members" in [d["field"] for d in r422.json()["detail"]], r422.text
    assert httpx.get(f"{svc.api}/v1/jobs", timeout=10).json()["total"] == before + 1


def test_from_python_and_train_local(tmp_path: Path) -> None:
    """The README's Python snippet, and `robust-ensembles train-local --spec spec.json --out runs/x` with the
    snippet's spec in spec.json (the README's "the same from the shell"), both in a fresh directory."""
    section = readme_section("Using the service")
    [snippet] = fenced_blocks(section, "python")
    env = _clean_env(tmp_path / "state", _free_port())
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=JOB_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"the README's Python snippet failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    acc = float(r.stdout.strip().splitlines()[-1])
    assert MIN_ACC < acc <= 1.0, r.stdout[-2000:]
    spec = snippet_spec(snippet)
    outs = [p for p in (tmp_path / "runs").iterdir() if (p / "ensemble.pt").is_file()]
    assert len(outs) == 1, list((tmp_path / "runs").iterdir())

    argv = inline_command(section, "robust-ensembles train-local")
    spec_path = tmp_path / argv[argv.index("--spec") + 1]
    spec_path.write_text(json.dumps(spec))
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"`{shlex.join(argv)}` failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out_dir = tmp_path / argv[argv.index("--out") + 1]
    assert f"ensemble: {Path(argv[argv.index('--out') + 1]) / 'ensemble.pt'}" in r.stdout, r.stdout[-2000:]
    metrics = json.loads((out_dir / "results.json").read_text())["metrics"]
    assert MIN_ACC < metrics["test_clean_acc"] <= 1.0, metrics
    assert _check_ensemble(out_dir / "ensemble.pt", members=3) > MIN_ACC
