"""The built wheel is enough for ``robust-ensembles up`` (issue #25): migrations, the dashboard's static files
and the published leaderboard travel inside it, and the console script is the composition root.

Setting: the wheel is built (``pip wheel --no-deps --no-build-isolation``) from a copy of the source (the
checkout gets no ``build/``), installed with ``--no-deps`` into a fresh virtual environment in a temporary
directory, whose only link to the project's ``.venv`` is a ``.pth`` line naming that environment's
site-packages for the third-party dependencies (a line in a ``.pth`` file adds a directory to ``sys.path``
without running the ``.pth`` files inside it, so the ``.venv``'s editable install of this project is not
loaded). Every command runs from a directory outside the checkout, without ``PYTHONPATH`` or ``RE_*``
variables.

Covered: the wheel's contents; the installed package resolves its migrations, static files and leaderboard
inside the new environment, not in the checkout; ``robust-ensembles db upgrade`` from the installed package
against the test PostgreSQL; ``robust-ensembles up`` from the installed package (migrations against the test
PostgreSQL, the worker it starts through the entry point, a local Ray) runs a small train job to success and
serves the dashboard and the leaderboard.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "ensemble_core", "service", "workers", "migrations",
           "docs/results/leaderboard.json")
SMALL_TRAIN = {"method": "baseline", "dataset": "mnist", "architecture": "lenet5", "members": 2, "epochs": 1,
               "train_subset": 256, "eval_subset": 100, "batch_size": 64, "workers": 1, "seed": 0}


@dataclass
class Installed:
    wheel: Path
    venv: Path
    work: Path  # the working directory of every command: outside the checkout
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "robust-ensembles"

    def run(self, argv: list[str | Path], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = root / "src", root / "dist", root / "venv", root / "work"
    work.mkdir()
    _copy_sources(src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [wheel] = dist.glob("robust_ensembles-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = (venv / "lib").glob("python3*/site-packages")
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_robust_ensembles_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RE_") and k not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    inst = Installed(wheel=wheel, venv=venv, work=work, env=env)
    # pip from the dependencies' site-packages, run by the new interpreter, installs into the new environment;
    # --ignore-installed: the .venv's editable robust-ensembles (on sys.path there) is neither seen nor touched
    r = inst.run([inst.python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return inst


def test_the_wheel_carries_migrations_static_files_leaderboard_and_the_entry_point(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    versions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert {"service/migrations/env.py", "service/migrations/script.py.mako"} <= names
    assert {f"service/migrations/versions/{v}" for v in versions} <= names
    assert {f"service/static/{p.name}" for p in (REPO / "service" / "static").iterdir()} <= names
    assert {"service/published/leaderboard.json", "workers/main.py", "service/cli_common.py"} <= names
    assert "robust-ensembles = workers.main:main" in scripts
    assert not any(n.startswith(("migrations/", "docs/", "tests/")) for n in names), "nothing at the top level"


def test_the_installed_package_finds_what_it_needs_inside_the_environment(installed: Installed, pg_url: str) -> None:
    probe = ("import json, importlib.metadata as md, service, workers, ensemble_core, service.migrate as m, "
             "service.routes_ui as ui, service.routes_leaderboard as lb\n"
             "print(json.dumps({'files': [service.__file__, workers.__file__, ensemble_core.__file__],"
             " 'migrations': str(m.migrations_dir()), 'head': m.head_revision(), 'static': str(ui.STATIC_DIR),"
             " 'leaderboard': str(lb.PACKAGED_PATH), 'leaderboard_exists': lb.PACKAGED_PATH.is_file(),"
             " 'script': [e.value for e in md.entry_points(group='console_scripts')"
             " if e.name == 'robust-ensembles']}))")
    r = installed.run([installed.python, "-c", probe])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    venv = str(installed.venv.resolve())
    for path in [*out["files"], out["migrations"], out["static"], out["leaderboard"]]:
        assert path.startswith(venv) and not path.startswith(str(REPO)), (path, out)
    assert Path(out["migrations"]).name == "migrations" and Path(out["migrations"]).parent.name == "service"
    assert out["leaderboard_exists"] and (Path(out["static"]) / "index.html").is_file()
    assert out["script"] == ["workers.main:main"]  # the new environment's metadata, not the .venv's editable one

    r = installed.run([installed.script, "--help"])
    assert r.returncode == 0 and "worker" in r.stdout and "demo" in r.stdout, r.stderr
    r = installed.run([installed.script, "db", "upgrade", "--database-url", pg_url])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"database schema at revision {out['head']} (head {out['head']})" in r.stdout, r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


@contextlib.contextmanager
def _up(installed: Installed, database_url: str) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """``robust-ensembles up`` of the installed package; SIGTERM on exit (it stops its worker and Ray)."""
    data_dir = Path(tempfile.mkdtemp(prefix="re-whl-"))  # short: Ray's socket paths live under it
    port = _free_port()
    log_path = data_dir / "up.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([str(installed.script), "up", "--port", str(port), "--data-dir", str(data_dir),
                                 "--database-url", database_url, "--num-cpus", "2"], cwd=installed.work,
                                env=installed.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", data_dir, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(150)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in up's own process group
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_up_from_the_wheel_runs_a_small_job(installed: Installed, pg_url: str) -> None:
    t0 = time.monotonic()
    with _up(installed, pg_url) as (api, data_dir, proc):
        def diagnostics() -> str:
            return (f"\n--- up log:\n{_tail(data_dir / 'up.log')}\n--- worker log:\n"
                    f"{_tail(data_dir / 'logs' / 'worker.log')}")

        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"up exited with code {proc.returncode}" + diagnostics()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "up not ready within 120 s" + diagnostics()
            time.sleep(0.5)
        r = httpx.post(f"{api}/v1/jobs", json={"kind": "train", "spec": SMALL_TRAIN}, timeout=30)
        assert r.status_code in (200, 201, 202), r.text
        job_id = r.json()["id"]
        assert httpx.get(f"{api}/ui/", timeout=10).status_code == 200  # the dashboard's static files
        board = httpx.get(f"{api}/v1/leaderboard", timeout=30)
        assert board.status_code == 200 and board.json()["datasets"], board.text[:500]  # the packaged leaderboard
        deadline = time.monotonic() + 300
        while True:
            job = httpx.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert proc.poll() is None, f"up exited with code {proc.returncode}" + diagnostics()
            assert time.monotonic() < deadline, f"job still {job['status']} after 300 s" + diagnostics()
            time.sleep(1.0)
        assert job["status"] == "succeeded", json.dumps(job)[:2000] + diagnostics()
        assert "ensemble.pt" in {a["name"] for a in httpx.get(f"{api}/v1/jobs/{job_id}/artifacts",
                                                               timeout=10).json()["items"]}
    assert proc.returncode == 0, f"up exited with code {proc.returncode}"
    print(f"up + small train job from the wheel: {time.monotonic() - t0:.0f} s")
