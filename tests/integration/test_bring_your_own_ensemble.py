"""Acceptance of the model registry (#22): an ensemble trained outside the service with plain torch and saved
with safetensors is uploaded, evaluated (white-box, and as the transfer surrogate of another upload) and
exported; the RobustBench record has every field of their schema and the Hugging Face folder loads back into
an identical ensemble.

Real PostgreSQL, the real worker with Ray (the first evaluation runs in Ray tasks: 3 batches over 2 shards, each
loading the model's folder), real MNIST. The evaluations are small (60 and 40 images, FGSM and PGD-5).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from plain_torch import MEAN, STD, PlainLeNet, train_plain
from safetensors.torch import save_file

from ensemble_core import registry_io as rio
from ensemble_core.data import load_dataset
from ensemble_core.interchange import ROBUSTBENCH_FIELDS
from service import migrate
from service.app import create_app
from service.settings import Settings
from workers.worker import Worker

pytestmark = pytest.mark.integration

# robustbench.utils.ModelInfo's fields and the two its model_info files add, written out from their source
THEIR_FIELDS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote", "external", "unreliable"]


def wait_done(client: TestClient, job_id: str, timeout: float = 900.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s")


@pytest.fixture()
def client(pg_url: str, tmp_path: Path, ray_session: None) -> Iterator[TestClient]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, heartbeat_seconds=1.0, lease_seconds=60.0,
                        retry_backoff_seconds=1.0, poll_seconds=1.0)
    app = create_app(settings, warm=False)
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run, name="byo-test-worker", daemon=True)
    with TestClient(app) as c:
        thread.start()
        try:
            yield c
        finally:
            worker.stop()
            thread.join(300)


def train_outside(seeds: tuple[int, ...], out: Path) -> tuple[list[PlainLeNet], list[Path]]:
    """Members trained with a plain torch loop on 10,000 MNIST training images, each saved with safetensors."""
    train = load_dataset("mnist", "train").subset(list(range(10_000)))
    x, y = train.as_float()
    nets, files = [], []
    for s in seeds:
        net = train_plain(s, x, y, steps=150)
        path = out / f"member-{s}.safetensors"
        save_file(net.state_dict(), str(path))
        nets.append(net)
        files.append(path)
    return nets, files


def upload(client: TestClient, name: str, files: list[Path], **fields: str) -> dict[str, Any]:
    r = client.post("/v1/models", data={"name": name, "architecture": "lenet5", "dataset": "mnist",
                                        "mean": str(MEAN), "std": str(STD), "training": "plain torch: SGD "
                                        "(lr 0.05, momentum 0.9), 150 steps of 64 MNIST images", **fields},
                    files=[("weights", (p.name, p.read_bytes(), "application/octet-stream")) for p in files])
    assert r.status_code == 201, r.text
    return r.json()


def test_an_ensemble_trained_elsewhere_is_uploaded_evaluated_and_exported(client: TestClient,
                                                                          tmp_path: Path) -> None:
    torch.set_num_threads(1)
    nets_a, files_a = train_outside((0, 1), tmp_path)
    nets_b, files_b = train_outside((2, 3), tmp_path)
    a = upload(client, "plain-a", files_a, tags="byo", combine="mean_probs",
               paper='{"title": "Plain LeNets", "authors": "Some One", "venue": "Unpublished"}')
    b = upload(client, "plain-b", files_b)
    assert a["config"]["validation"]["accuracy"] >= 0.7  # trained members on real images: the range is right

    # white-box on A with B as the transfer surrogate (3 batches, 2 Ray shards); then A as B's surrogate
    ev_a = client.post("/v1/jobs", json={"kind": "evaluate", "spec": {
        "target_model": a["id"], "transfer_from_model": b["id"], "n_examples": 60, "batch_size": 20, "workers": 2,
        "attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}, {"name": "pgd", "eps": [0.1, 0.2], "steps": 5}],
        "transfer_attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}],
        "checks": {"n_examples": 20, "large_eps_steps": 5}, "member_transfer": None}})
    assert ev_a.status_code == 201, ev_a.text
    ev_b = client.post("/v1/jobs", json={"kind": "evaluate", "spec": {
        "target_model": b["id"], "transfer_from_model": a["id"], "n_examples": 40, "batch_size": 40,
        "attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}],
        "transfer_attacks": [{"name": "pgd", "eps": [0.1, 0.2], "steps": 5}],
        "checks": {"n_examples": 20, "large_eps_steps": 5, "convergence": False}, "member_transfer": None}})
    assert ev_b.status_code == 201, ev_b.text
    done_a, done_b = wait_done(client, ev_a.json()["id"]), wait_done(client, ev_b.json()["id"])
    assert done_a["status"] == "succeeded", done_a
    assert done_b["status"] == "succeeded", done_b

    res_a = client.get(f"/v1/jobs/{done_a['id']}/results").json()
    assert res_a["shards"] == 2
    assert res_a["models"]["target"]["ref"].endswith(a["id"]) and res_a["models"]["target"]["deployed_rule"] == \
        "mean_probs"
    assert res_a["surrogates"]["surrogate"]["ref"].endswith(b["id"])
    kinds = {(r["threat"], r["attack"]) for r in res_a["records"] if r["model"] == "target"}
    assert {("white-box", "fgsm"), ("white-box", "pgd-5"), ("transfer", "fgsm")} <= kinds
    res_b = client.get(f"/v1/jobs/{done_b['id']}/results").json()
    assert res_b["surrogates"]["surrogate"]["ref"].endswith(a["id"])  # A, the upload, as a transfer surrogate
    assert any(r["threat"] == "transfer" for r in res_b["records"])
    evals = client.get(f"/v1/models/{a['id']}/evaluations").json()["items"]
    assert [e["id"] for e in evals] == [done_a["id"]]  # B's evaluation used A as surrogate, not as target

    # RobustBench: every field of their schema, their conventions, our figures
    rec = client.get(f"/v1/models/{a['id']}/export/robustbench").json()
    assert list(rec) == THEIR_FIELDS == list(ROBUSTBENCH_FIELDS)
    assert rec["number_forward_passes"] == 2 and rec["dataset"] == "mnist" and rec["eps"] == "0.2"
    assert rec["name"] == "Plain LeNets" and rec["authors"] == "Some One" and rec["architecture"] == "lenet5"
    assert rec["clean_acc"] == f"{100 * res_a['clean']['target']['clean_acc']:.2f}"
    anyatk = next(r for r in res_a["records"] if r["model"] == "target" and r["attack"] == "any attack (Linf)"
                  and r["eps"] == 0.2)
    assert rec["external"] == f"{100 * anyatk['robust_acc']:.2f}"
    assert rec["autoattack_acc"] is None and isinstance(rec["unreliable"], bool)
    assert done_a["id"] in rec["footnote"] and "60 mnist test images" in rec["footnote"]
    at_01 = client.get(f"/v1/models/{a['id']}/export/robustbench", params={"eps": 0.1}).json()
    assert at_01["eps"] == "0.1" and float(at_01["external"]) >= float(rec["external"])
    bad = client.get(f"/v1/models/{a['id']}/export/robustbench", params={"eps": 0.3})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "query.eps"

    # Hugging Face layout: the folder loads back into an identical ensemble
    out = tmp_path / "exported"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        r = client.get(f"/v1/models/{a['id']}/export/huggingface/{name}")
        assert r.status_code == 200, r.text
        (out / name).write_bytes(r.content)
    ens = rio.load_folder(out)
    assert ens.combine == "mean_probs" and len(ens) == 2
    for member, net in zip(rio.read_members(out), nets_a, strict=True):
        assert member.keys() == net.state_dict().keys()
        assert all(torch.equal(member[k], v) for k, v in net.state_dict().items())  # bit-identical weights
    x, y = load_dataset("mnist", "test").subset(list(range(200))).as_float()
    with torch.no_grad():
        assert torch.allclose(ens.member_logits(x), torch.stack([n(x) for n in nets_a]), atol=1e-5)
        probs = torch.stack([n(x).softmax(-1) for n in nets_a]).mean(0)
        assert torch.equal(ens.predict(x), probs.argmax(1))
    card = (out / "README.md").read_text()
    assert f"### Evaluate job `{done_a['id']}`" in card and "| white-box | pgd-5 | Linf | 0.2 |" in card
    assert "plain torch: SGD" in card and "model-index:" in card and "Plain LeNets" in card

    # a deleted model: an evaluation naming it fails with an error naming it
    assert client.delete(f"/v1/models/{b['id']}").status_code == 200
    gone = client.post("/v1/jobs", json={"kind": "evaluate", "spec": {"target_model": b["id"]}})
    assert gone.status_code == 422 and gone.json()["detail"][0]["field"] == "spec.target_model"
