"""The local Ray of ``robust-ensembles up`` listens on loopback only, and its token file is private.

Found by the black-box probe (issue #27): under ``up`` the GCS server, the raylet and the workers listened
on every interface and the runtime-env agent on the machine's external address (the loopback setting
was applied after ``import ray``, too late), and Ray's token file was world-readable (0644).

The test starts Ray the way ``up`` does: a subprocess with the environment ``up`` gives its worker
(:class:`service.up.WorkerProcess` with the entry point's ``worker_env``, :data:`workers.main.ENTRY`) calling
:func:`workers.worker.connect_ray` with the worker's Ray temp dir,
with ``ray`` imported first (the harder case), and its own ``HOME`` (so Ray's default token path is
the test's). It runs a task and an actor, so worker processes exist, then lists every listening socket
of the process tree.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings
from service.up import WorkerProcess
from workers.main import ENTRY

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

SCRIPT = r"""
import json, os, sys, time
import ray  # imported before connect_ray: the loopback setting must still take effect
import psutil
from pathlib import Path
from workers.main import ray_temp_dir
from service.settings import Settings
from workers.worker import connect_ray

settings = Settings(data_dir=Path(sys.argv[1]))
connect_ray(None, temp_dir=ray_temp_dir(settings), num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

@ray.remote(num_cpus=0)
def task():
    return os.getpid()

actor = Probe.remote()
pids = ray.get([task.remote(), actor.pid.remote()])
time.sleep(2)  # agents start listening a little after the node is up
me = psutil.Process()
tree = {p.pid: p for p in [me, *me.children(recursive=True)]}
sockets = []
for c in psutil.net_connections("inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in tree:
        try:
            name = tree[c.pid].name()
        except psutil.Error:
            name = "?"
        sockets.append([name, c.laddr.ip, c.laddr.port])
print("RESULT " + json.dumps({"sockets": sockets, "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH"),
                               "auth_mode": os.environ.get("RAY_AUTH_MODE"), "pids": pids,
                               "node_ip": ray.util.get_node_ip_address()}))
ray.shutdown()
"""


@pytest.mark.parametrize("how", ["up", "worker"])
def test_ups_ray_listens_on_loopback_only_and_its_token_file_is_private(tmp_path: Path, how: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``up``: the environment ``up`` gives its worker. ``worker``: ``robust-ensembles worker`` started by
    hand, without that environment; ``connect_ray`` alone must keep the Ray it starts on loopback."""
    # a user's shell: not the test session's environment (tests/conftest.py sets the loopback variable)
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    data_dir = tmp_path / "data"
    home = tmp_path / "home"
    home.mkdir()
    proc = WorkerProcess(Settings(data_dir=data_dir), "postgresql://unused", command=(*ENTRY.program, "worker"),
                         local_ray_env=ENTRY.worker_env, ray_address=None, num_cpus=1, log_path=tmp_path / "worker.log")
    env = dict(proc.env) if how == "up" else dict(os.environ)
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(data_dir)], env=env, capture_output=True, text=True,
                       timeout=240)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    names = {s[0] for s in out["sockets"]}
    assert "gcs_server" in names and "raylet" in names, out["sockets"]
    outside = [s for s in out["sockets"] if s[1] not in LOOPBACK]
    assert not outside, f"Ray processes listening beyond loopback: {outside}"
    assert out["node_ip"] == "127.0.0.1"
    # token authentication on, with a token file of mode 0600 (and none written to ~/.ray, world-readable)
    assert out["auth_mode"] == "token" and out["token_path"], out
    token = Path(out["token_path"])
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)
    assert len(token.read_text().strip()) == 64
    default = home / ".ray" / "auth_token"
    assert not default.exists() or stat.S_IMODE(default.stat().st_mode) == 0o600
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") != str(token)  # the test process itself is untouched
