"""The model registry over REST against a real PostgreSQL: uploads, refusals that store nothing, tenancy,
registration of a train job, the Hugging Face export and the CLI.

No Ray: the train job whose ensemble is registered is trained in-process (``train_local``) and its row is put
through the real queue's states; the evaluations of registered models run in test_bring_your_own_ensemble.py.
"""

from __future__ import annotations

import io
import json
import pickle
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from plain_torch import MEAN, STD, plain
from safetensors.torch import save
from sqlalchemy import text

from ensemble_core import registry_io as rio
from ensemble_core.checkpoint import load_ensemble
from ensemble_core.data import load_dataset
from service import migrate
from service.app import create_app
from service.auth import TokenStore
from service.queue import Queue
from service.settings import Settings

pytestmark = pytest.mark.integration

MAX_MODEL_BYTES = 4_000_000  # two LeNet members (3.45 MB) fit, three do not
FIELDS = {"name": "plain-lenet", "architecture": "lenet5", "dataset": "mnist", "mean": str(MEAN), "std": str(STD),
          "tags": "mnist,plain-torch", "training": "plain torch, SGD"}


@dataclass
class Env:
    client: TestClient
    app: Any
    queue: Queue
    settings: Settings
    alice: str
    bob: str
    admin: str

    def h(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def upload(self, token: str, blobs: list[bytes], **fields: str) -> Any:
        files = [("weights", (f"m{i}.safetensors", b, "application/octet-stream")) for i, b in enumerate(blobs)]
        return self.client.post("/v1/models", data={**FIELDS, **fields}, files=files, headers=self.h(token))

    def get(self, token: str | None, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=self.h(token), **kw)

    def stored(self) -> tuple[int, list[str]]:
        """Rows in ``models`` and entries in the models directory (hidden temporaries included)."""
        with self.queue.engine.connect() as c:
            n = int(c.execute(text("SELECT count(*) FROM models")).scalar_one())
        root = self.settings.models_root
        return n, sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture()
def env(pg_url: str, tmp_path: Path) -> Iterator[Env]:
    migrate.upgrade(pg_url)
    settings = Settings(data_dir=tmp_path, database_url=pg_url, auth=True, max_model_bytes=MAX_MODEL_BYTES)
    app = create_app(settings, warm=False)
    tokens = TokenStore(app.state.queue.engine)
    alice, _ = tokens.create("alice")
    bob, _ = tokens.create("bob")
    admin, _ = tokens.create("ops", admin=True)
    with TestClient(app) as client:
        yield Env(client, app, app.state.queue, settings, alice, bob, admin)


def blobs(*seeds: int) -> list[bytes]:
    return [save(plain(s).state_dict()) for s in seeds]


def test_an_upload_is_validated_stored_listed_exported_and_deleted(env: Env, tmp_path: Path) -> None:
    r = env.upload(env.alice, blobs(0, 1))
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["name"], m["version"], m["tags"], m["owner"]) == ("plain-lenet", "1", ["mnist", "plain-torch"], "alice")
    assert (m["architecture"], m["dataset"], m["combine"], m["members"], m["source"]) == (
        "lenet5", "mnist", "mean_logits", 2, "upload")
    val = m["config"]["validation"]
    assert val["images"] == 20 and val["output_shape"] == [20, 10] and len(val["member_accuracy"]) == 2
    assert m["config"]["input"]["mean"] == [MEAN] and m["config"]["training"] == "plain torch, SGD"
    assert env.stored() == (1, [m["id"]])
    assert [x["id"] for x in env.get(env.alice, "/v1/models").json()["items"]] == [m["id"]]
    assert env.get(env.alice, "/v1/models", params={"tag": "plain-torch"}).json()["total"] == 1
    assert env.get(env.alice, "/v1/models", params={"tag": "cifar"}).json()["total"] == 0
    assert env.get(env.alice, f"/v1/models/{m['id']}").json()["sha256"] == m["sha256"]

    listing = env.get(env.alice, f"/v1/models/{m['id']}/export/huggingface").json()
    assert [f["name"] for f in listing["files"]] == ["config.json", "model.safetensors", "README.md"]
    out = tmp_path / "hf"
    out.mkdir()
    for f in listing["files"]:
        r = env.get(env.alice, f"/v1/models/{m['id']}/export/huggingface/{f['name']}")
        assert r.status_code == 200, r.text
        (out / f["name"]).write_bytes(r.content)
    ens = rio.load_folder(out)
    x, _ = load_dataset("mnist", "test").subset(list(range(32))).as_float()
    with torch.no_grad():
        expected = torch.stack([plain(0)(x), plain(1)(x)])
        assert torch.allclose(ens.member_logits(x), expected, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "Not evaluated yet." in card and "plain torch, SGD" in card and "library_name: robust-ensembles" in card
    assert env.get(env.alice, f"/v1/models/{m['id']}/export/huggingface/ensemble.pt").status_code == 404
    assert env.get(env.alice, f"/v1/models/{m['id']}/export/robustbench").status_code == 409  # not evaluated

    # the same name and version again: 409, and nothing more is stored
    again = env.upload(env.alice, blobs(2, 3))
    assert again.status_code == 409 and "exists already" in again.json()["detail"]
    assert env.stored() == (1, [m["id"]])
    assert env.upload(env.alice, blobs(2, 3), version="2").status_code == 201
    assert env.upload(env.bob, blobs(2, 3)).status_code == 201  # names are per owner

    d = env.client.delete(f"/v1/models/{m['id']}", headers=env.h(env.alice))
    assert d.status_code == 200 and d.json()["id"] == m["id"]
    assert env.get(env.alice, f"/v1/models/{m['id']}").status_code == 404
    assert m["id"] not in env.stored()[1] and env.stored()[0] == 2


def _pickle_named_safetensors() -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))
    return pickle.dumps({"conv1.weight": Evil()})


def _torch_save() -> bytes:
    buf = io.BytesIO()
    torch.save(plain(0).state_dict(), buf)
    return buf.getvalue()


def _wrong_shapes() -> bytes:
    sd = plain(0).state_dict()
    sd["fc1.weight"] = torch.zeros(500, 801)
    return save(sd)


@pytest.mark.parametrize("case, make, fields, status, field, message", [
    ("pickle renamed .safetensors", lambda: [_pickle_named_safetensors()], {}, 422, "weights", "a pickle is refused"),
    ("torch.save zip", lambda: [_torch_save()], {}, 422, "weights", "zip archive"),
    ("wrong tensor shapes", lambda: [save(plain(1).state_dict()), _wrong_shapes()], {}, 422, "weights",
     r"member 1: 'fc1.weight' has shape \[500, 801\]"),
    ("another architecture's tensors", lambda: blobs(0), {"architecture": "lenet5_classic"}, 422, "weights",
     "has shape"),
    ("unknown architecture", lambda: blobs(0), {"architecture": "wideresnet99"}, 422, "architecture",
     "unknown architecture 'wideresnet99'"),
    ("unknown dataset", lambda: blobs(0), {"dataset": "svhn"}, 422, "dataset", "unknown dataset"),
    ("unknown combine rule", lambda: blobs(0), {"combine": "median"}, 422, "combine", "unknown combine rule"),
    ("a name with a path", lambda: blobs(0), {"name": "../../etc/evil"}, 422, "name", "no '/', no path"),
    ("a name with a slash", lambda: blobs(0), {"name": "a/b"}, 422, "name", "no path"),
    ("a version with a path", lambda: blobs(0), {"version": "../1"}, 422, "version", "a version is"),
    ("a bad tag", lambda: blobs(0), {"tags": "ok,not ok"}, 422, "tags", "tag 'not ok'"),
    ("a bad input range", lambda: blobs(0), {"input_range": "0,1,2"}, 422, "input_range", "expected 2 numbers"),
    ("a zero std", lambda: blobs(0), {"std": "0"}, 422, "std", "positive"),
    ("paper not an object", lambda: blobs(0), {"paper": "[1]"}, 422, "paper", "JSON object"),
    ("paper with a bad link", lambda: blobs(0), {"paper": json.dumps({"link": "javascript:x"})}, 422, "paper.link",
     "pattern"),
    ("a file over the limit", lambda: blobs(0, 1, 2), {}, 413, None, f"larger than {MAX_MODEL_BYTES} bytes"),
])
def test_refusals_name_the_field_and_store_nothing(env: Env, case: str, make: Any, fields: dict[str, str],
                                                   status: int, field: str | None, message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import re

    r = env.upload(env.alice, make(), **fields)
    assert r.status_code == status, (case, r.text)
    detail = r.json()["detail"]
    if field is None:
        assert re.search(message, detail), detail
    else:
        items = [d for d in detail if d["field"] == field]
        assert items and re.search(message, items[0]["msg"]), (case, detail)
    assert env.stored() == (0, [])
    assert "pwned" not in capsys.readouterr().out


def test_a_missing_field_and_a_missing_file_are_422_naming_them(env: Env) -> None:
    r = env.client.post("/v1/models", data={"architecture": "lenet5", "dataset": "mnist"},
                        files=[("weights", ("a", save(plain(0).state_dict())))], headers=env.h(env.alice))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "name"
    r = env.client.post("/v1/models", data=FIELDS, headers=env.h(env.alice))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "weights"
    assert env.stored() == (0, [])


def test_another_owners_model_is_404_everywhere(env: Env) -> None:
    m = env.upload(env.alice, blobs(0)).json()
    mid = m["id"]
    for path in (f"/v1/models/{mid}", f"/v1/models/{mid}/evaluations", f"/v1/models/{mid}/export/robustbench",
                 f"/v1/models/{mid}/export/huggingface", f"/v1/models/{mid}/export/huggingface/config.json",
                 f"/v1/models/{mid}/export/huggingface/model.safetensors",
                 f"/v1/models/{mid}/export/huggingface/README.md"):
        r = env.get(env.bob, path)
        assert r.status_code == 404 and r.json()["detail"] == f"no model with id {mid}", (path, r.text)
        missing = env.get(env.bob, path.replace(mid, str(uuid.uuid4())))
        assert missing.status_code == 404 and missing.json()["detail"].startswith("no model with id")  # same answer
        assert env.get(env.alice, path).status_code in (200, 409)
    assert env.client.delete(f"/v1/models/{mid}", headers=env.h(env.bob)).status_code == 404
    assert env.get(env.bob, "/v1/models").json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
    for field in ("target_model", "transfer_from_model", "baseline_model"):
        spec = {"target_model": str(uuid.uuid4()), field: mid}
        r = env.client.post("/v1/jobs", json={"kind": "evaluate", "spec": spec}, headers=env.h(env.bob))
        assert r.status_code == 422, r.text
        assert {"field": f"spec.{field}", "msg": f"no model with id {mid}"}.items() <= {
            k: v for d in r.json()["detail"] if d["field"] == f"spec.{field}" for k, v in d.items()}.items()
    ok = env.client.post("/v1/jobs", json={"kind": "evaluate", "spec": {"target_model": mid.upper()}},
                         headers=env.h(env.alice))
    assert ok.status_code == 201 and ok.json()["spec"]["target_model"] == mid  # canonical form
    both = env.client.post("/v1/jobs", json={"kind": "evaluate", "spec": {"target_model": mid, "target_job": mid}},
                           headers=env.h(env.alice))
    assert both.status_code == 422 and "exactly one of target_job, target_checkpoint and target_model" in both.text
    assert env.get(env.admin, f"/v1/models/{mid}").status_code == 200
    assert env.get(env.admin, "/v1/models").json()["total"] == 1
    assert env.get(None, "/v1/models").status_code == 401


def _succeeded_train_job(env: Env, owner: str, tmp_path: Path) -> tuple[str, Path]:
    """A real ensemble.pt (trained in-process) as the artifact of a train job that went through the queue."""
    from ensemble_core.training import train_local

    spec = {"method": "baseline", "dataset": "synthetic", "members": 2, "epochs": 1, "batch_size": 64,
            "eval_subset": 100}
    _, ckpt = train_local(spec, tmp_path / "run", progress=False, log=lambda s: None)
    job, _ = env.queue.submit("train", json.loads(json.dumps(spec)), owner=owner)
    art = env.settings.job_artifacts_dir(str(job["id"]))
    art.mkdir(parents=True)
    (art / "ensemble.pt").write_bytes(ckpt.read_bytes())
    with env.queue.engine.begin() as c:
        c.execute(text("UPDATE jobs SET status = 'succeeded', result = '{}', finished_at = now() WHERE id = :id"),
                  {"id": job["id"]})
    return str(job["id"]), ckpt


def test_a_succeeded_train_job_registers_with_its_spec(env: Env, tmp_path: Path) -> None:
    job_id, ckpt = _succeeded_train_job(env, "alice", tmp_path)
    body = {"name": "baseline-synthetic", "version": "3", "tags": ["mine"],
            "paper": {"title": "Baseline", "reported": 0.5}}
    assert env.client.post(f"/v1/jobs/{job_id}/register", json=body, headers=env.h(env.bob)).status_code == 404
    r = env.client.post(f"/v1/jobs/{job_id}/register", json=body, headers=env.h(env.alice))
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["source"], m["source_job_id"], m["owner"], m["members"]) == ("train_job", job_id, "alice", 2)
    assert m["config"]["training"]["method"] == "baseline" and m["config"]["paper"]["reported"] == 0.5
    x, _ = load_dataset("synthetic", "test").as_float()
    with torch.no_grad():
        assert torch.equal(rio.load_folder(env.settings.models_root / m["id"]).member_logits(x),
                           load_ensemble(ckpt).member_logits(x))
    dup = env.client.post(f"/v1/jobs/{job_id}/register", json=body, headers=env.h(env.alice))
    assert dup.status_code == 409
    bad = env.client.post(f"/v1/jobs/{job_id}/register", json={**body, "name": "a/b", "version": "4"},
                          headers=env.h(env.alice))
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "name"
    queued, _ = env.queue.submit("train", {"method": "baseline"}, owner="alice")
    r = env.client.post(f"/v1/jobs/{queued['id']}/register", json={"name": "x"}, headers=env.h(env.alice))
    assert r.status_code == 409 and "is queued" in r.json()["detail"]
    # a succeeded job whose ensemble.pt is unreadable (torn, or not a checkpoint) is a 409 naming the file,
    # not a 500 (the API fuzzer found this one)
    torn_id, _ = _succeeded_train_job(env, "alice", tmp_path / "torn")
    (env.settings.job_artifacts_dir(torn_id) / "ensemble.pt").write_bytes(b"weights")
    r = env.client.post(f"/v1/jobs/{torn_id}/register", json={**body, "version": "9"}, headers=env.h(env.alice))
    assert r.status_code == 409 and "ensemble.pt cannot be read" in r.json()["detail"], r.text
    # an evaluation of the job (target_job) is an evaluation of the model
    ev = env.client.post("/v1/jobs", json={"kind": "evaluate", "spec": {"target_job": job_id}},
                         headers=env.h(env.alice)).json()
    evals = env.get(env.alice, f"/v1/models/{m['id']}/evaluations").json()["items"]
    assert [e["id"] for e in evals] == [ev["id"]]
    assert env.stored()[0] == 1


def test_the_cli_uploads_lists_shows_exports_and_deletes(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import service.cli_models as cli_models
    from service.cli import main
    from service.client import Client

    def client(args: Any) -> Client:
        c = Client.__new__(Client)
        c.base_url = "http://testserver"
        c.http = TestClient(env.app, headers=env.h(env.alice))
        return c

    monkeypatch.setattr(cli_models, "_client", client)
    files = []
    for i, b in enumerate(blobs(0, 1)):
        (tmp_path / f"m{i}.safetensors").write_bytes(b)
        files.append(str(tmp_path / f"m{i}.safetensors"))
    assert main(["models", "upload", *files, "--name", "cli-lenet", "--architecture", "lenet5", "--dataset", "mnist",
                 "--mean", str(MEAN), "--std", str(STD), "--tag", "cli"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("registered ") and "cli-lenet" in out
    mid = out.split()[1]
    assert main(["models", "list"]) == 0 and mid in capsys.readouterr().out
    assert main(["models", "show", mid, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == mid and shown["evaluations"] == []
    assert main(["models", "export", mid, "--format", "huggingface", "-o", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert rio.read_config(tmp_path / "hf")["name"] == "cli-lenet"
    assert main(["models", "export", mid]) == 1  # not evaluated yet: the API's 409 is the CLI's error
    assert "no succeeded evaluation" in capsys.readouterr().err
    assert main(["models", "upload", files[0], "--name", "x/y", "--architecture", "lenet5", "--dataset",
                 "mnist"]) == 1
    assert "name:" in capsys.readouterr().err
    assert main(["models", "delete", mid]) == 0 and "deleted" in capsys.readouterr().out
    assert env.stored() == (0, [])
    job_id, _ = _succeeded_train_job(env, "alice", tmp_path)
    assert main(["models", "register", job_id, "--name", "from-job", "--version", "7", "--tag", "cli", "--json"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert (registered["source_job_id"], registered["version"], registered["tags"]) == (job_id, "7", ["cli"])
