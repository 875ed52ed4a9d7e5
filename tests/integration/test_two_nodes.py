"""A DDP train job whose two Ray Train workers land on two different Ray nodes (issue 12).

The nodes are separate processes started by docker/two-node-ray.sh on 127.0.0.2 and 127.0.0.3, one
CPU each, with Ray's token authentication on; the driver runs in a subprocess (the test session's
own Ray stays untouched) and reports where each Ray Train worker actor ran.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, os, sys, tempfile
import ray
ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address="127.0.0.2", log_to_driver=False)
from workers.ray_train import run_train_job
from ensemble_core.checkpoint import load_ensemble
tmp = tempfile.mkdtemp()
spec = {"method": "baseline", "dataset": "mnist", "members": 2, "epochs": 1, "batch_size": 64,
        "train_subset": 1024, "eval_subset": 200, "workers": 2}
epochs = []
out = run_train_job(spec, job_id="two-node", storage_path=os.path.join(tmp, "storage"),
                    artifacts_dir=os.path.join(tmp, "artifacts"), on_epoch=epochs.append,
                    should_stop=lambda: False, log=lambda s: None)
# the GCS actor table (no dashboard needed) keeps finished actors with the node they ran on
actors = ray._private.state.actors().values()
workers = [a for a in actors if "TrainWorker" in a["ActorClassName"]]
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
load_ensemble(os.path.join(tmp, "artifacts", "ensemble.pt"))
print("RESULT " + json.dumps({"worker_nodes": sorted(a["Address"]["IPAddress"] for a in workers),
                              "alive_nodes": sorted(nodes.values()), "epochs": len(epochs),
                              "acc": out["metrics"]["test_clean_acc"]}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_workers_run_on_two_nodes() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE_WINDOWS")}
    # a short path: Ray's unix sockets live under it and AF_UNIX paths are limited to 107 bytes
    env["TWO_NODE_STATE"] = tempfile.mkdtemp(prefix="re2n-", dir="/tmp")
    script = ROOT / "docker" / "two-node-ray.sh"
    start = subprocess.run([str(script), "start", str(port)], env=env, capture_output=True, text=True,
                           timeout=180)
    assert start.returncode == 0, start.stderr + start.stdout
    try:
        exports = start.stdout.strip().splitlines()[-1].removeprefix("export ").split()
        env.update(dict(e.split("=", 1) for e in exports))
        run = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, run.stdout[-3000:] + run.stderr[-3000:]
        result = json.loads(line[0].removeprefix("RESULT "))
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=120)
    assert result["alive_nodes"] == ["127.0.0.2", "127.0.0.3"]
    assert result["worker_nodes"] == ["127.0.0.2", "127.0.0.3"]  # one DDP rank on each node
    assert result["epochs"] == 1 and result["acc"] > 0.5
