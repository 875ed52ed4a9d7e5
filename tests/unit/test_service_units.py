"""Fast checks of the service's pure parts: spec validation and error locations, URLs, artifact paths,
CLI spec building, JSON cleaning, result tables; and that the API starts without importing torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import safe_artifact_path
from service.cli import build_parser, build_spec
from service.db import libpq_url, sqlalchemy_url
from service.queue import request_hash, to_json, trial_status
from service.report import format_evaluate, text_table
from service.settings import load_settings
from service.submission import SpecError, validate_spec

LR = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}


def _fields(kind: str, spec: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        validate_spec(kind, spec)
    return [x["field"] for x in e.value.errors]


def test_spec_errors_name_the_field_in_the_request_body() -> None:
    assert _fields("train", {"hyperparameters": {"zeta": 1}}) == ["spec.hyperparameters.zeta"]
    assert _fields("train", {"members": 0}) == ["spec.members"]
    assert _fields("train", {"epochs": 0, "members": 0}) == ["spec.members", "spec.epochs"]
    # model-level validators report no location: the field their message names is used
    assert _fields("train", {"epochs": 1, "schedule": {"name": "multistep", "milestones": [2]}}) == [
        "spec.schedule.milestones"]
    assert _fields("evaluate", {}) == ["spec.target_job"]
    assert _fields("tune", {"base": {"members": 0}, "search_space": LR}) == ["spec.base.members"]
    assert _fields("nonsense", {}) == ["kind"]


def test_validate_spec_returns_the_resolved_spec() -> None:
    r = validate_spec("train", {"members": 4, "dataset": "fmnist"})
    assert r["members"] == 4 and r["dataset"] == "fashion_mnist"  # alias resolved
    assert r["optimizer"]["name"] == "adam" and r["schedule"]["name"] == "constant" and r["seed"] == 0
    t = validate_spec("tune", {"base": {"members": 2}, "search_space": LR})
    assert t["base"]["members"] == 2 and t["base"]["optimizer"]["lr"] == 0.001  # the base is resolved too
    json.dumps(r)


def test_database_urls_are_normalised_for_sqlalchemy_and_libpq() -> None:
    sock = "postgresql://postgres:@/robust_ensembles?host=/tmp/pg"
    assert sqlalchemy_url(sock) == "postgresql+psycopg://postgres:@/robust_ensembles?host=%2Ftmp%2Fpg"
    assert libpq_url(sqlalchemy_url(sock)) == "postgresql://postgres:@/robust_ensembles?host=%2Ftmp%2Fpg"
    assert sqlalchemy_url("postgres://u:p%40ss@db:5432/x") == "postgresql+psycopg://u:p%40ss@db:5432/x"
    with pytest.raises(ValueError, match="PostgreSQL"):
        sqlalchemy_url("sqlite:///x.db")


def test_settings_layout_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("RE_LEASE_SECONDS", "12")
    s = load_settings(tmp_path)
    assert s.database_url is None and s.lease_seconds == 12.0
    assert s.artifacts_root == tmp_path / "artifacts" and s.ray_storage_path == tmp_path / "ray_storage"
    assert s.job_artifacts_dir("abc") == tmp_path / "artifacts" / "abc"
    monkeypatch.setenv("RE_LEASE_SECONDS", "soon")
    with pytest.raises(ValueError, match="RE_LEASE_SECONDS"):
        load_settings(tmp_path)


def test_artifact_paths_never_leave_the_job_directory(tmp_path: Path) -> None:
    job = tmp_path / "artifacts" / "j1"
    (job / "plots").mkdir(parents=True)
    (job / "ensemble.pt").write_bytes(b"x")
    (job / "plots" / "a.png").write_bytes(b"x")
    (job / ".hidden").write_bytes(b"x")
    (tmp_path / "artifacts" / "j2").mkdir()
    (tmp_path / "artifacts" / "j2" / "ensemble.pt").write_bytes(b"other job")
    (job / "link.pt").symlink_to(tmp_path / "artifacts" / "j2" / "ensemble.pt")
    assert safe_artifact_path(job, "ensemble.pt") == (job / "ensemble.pt").resolve()
    assert safe_artifact_path(job, "plots/a.png") == (job / "plots" / "a.png").resolve()
    for bad in ("../j2/ensemble.pt", "/etc/passwd", "plots/../../j2/ensemble.pt", ".hidden", "link.pt", "plots",
                "", "a\x00b", "plots//a.png", "missing"):
        assert safe_artifact_path(job, bad) is None, bad


def test_cli_builds_specs_from_files_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "spec.json"
    f.write_text(json.dumps({"method": "baseline", "optimizer": {"lr": 0.01}}))
    spec = build_spec(str(f), ["members=5", "optimizer.name=sgd", "hyperparameters.label_smoothing=0.1",
                               "dataset=mnist", "train_subset=null"])
    assert spec == {"method": "baseline", "optimizer": {"lr": 0.01, "name": "sgd"}, "members": 5,
                    "hyperparameters": {"label_smoothing": 0.1}, "dataset": "mnist", "train_subset": None}
    with pytest.raises(SystemExit):
        build_spec(None, ["members"])


def test_cli_parser_knows_every_command() -> None:
    from workers.main import build_parser as entry_parser
    from workers.main import cmd_worker

    p = entry_parser()  # the console script's: service.cli's commands plus workers' `worker`
    for argv in (["up", "--port", "9000", "--data-dir", "/tmp/x"], ["demo"], ["worker", "--address", "auto"],
                 ["serve"], ["db", "upgrade"], ["db", "downgrade", "base"], ["submit", "train", "--set", "a=1"],
                 ["status"], ["status", "abc"], ["watch", "abc"], ["logs", "abc", "-f"], ["metrics", "abc"],
                 ["results", "abc"], ["artifacts", "abc", "--download", "ensemble.pt"], ["cancel", "abc"],
                 ["methods"], ["train-local", "--spec", "s.json", "--out", "o"]):
        args = p.parse_args(argv)
        assert callable(args.func), argv
    assert p.parse_args(["up"]).port == 8000
    assert p.parse_args(["worker"]).func is cmd_worker
    # service.cli alone (python -m service.cli) parses every command too; its `worker` only says where the worker is
    assert build_parser().parse_args(["worker"]).func is not cmd_worker


def test_the_worker_refuses_a_mistyped_warm_setting_before_touching_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from workers.main import build_parser as entry_parser

    monkeypatch.setenv("RE_WARM_TRAIN", "maybe")
    args = entry_parser().parse_args(["worker", "--data-dir", str(tmp_path), "--database-url", "postgresql://x@nowhere/y"])
    assert args.func(args) == 2
    assert "RE_WARM_TRAIN must be one of" in caplog.text and "'maybe'" in caplog.text
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
    monkeypatch.delenv("RE_WARM_TRAIN")
    monkeypatch.setenv("RE_WARM_DDP", "sure")
    assert args.func(args) == 2
    assert "RE_WARM_DDP must be one of" in caplog.text and "'sure'" in caplog.text
    assert not any(tmp_path.iterdir())


def test_json_for_jsonb_columns_drops_nan_and_converts_scalars() -> None:
    assert json.loads(to_json({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})) == {"a": None,
                                                                                      "b": [1.0, None], "c": {"d": 2}}
    assert request_hash("train", {"a": 1, "b": 2}, 0, None) == request_hash("train", {"b": 2, "a": 1}, 0, None)
    assert request_hash("train", {"a": 1}, 0, None) != request_hash("train", {"a": 1}, 1, None)
    assert [trial_status(s) for s in ("PENDING", "RUNNING", "TERMINATED", "ERROR", "PAUSED")] == [
        "queued", "running", "succeeded", "failed", "queued"]


def test_results_tables_render_as_aligned_text() -> None:
    assert text_table(["a", "bb"], [["1", "2"], ["333", "4"]]) == "a    bb\n---  --\n1    2\n333  4"
    out = format_evaluate({"tables": [{"title": "Clean accuracy (%)", "columns": ["model", "clean acc"],
                                       "rows": [["target", "97.0"]], "notes": ""}]})
    assert out.splitlines() == ["Clean accuracy (%)", "model   clean acc", "------  ---------", "target  97.0"]


def test_the_api_starts_without_importing_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"app = create_app(Settings(data_dir=Path({str(tmp_path)!r}), database_url='postgresql://u@/d'), warm=False)\n"
        "assert app.openapi()['paths']\n"
        "print(sorted(m for m in ('torch', 'ray', 'optuna', 'ensemble_core.methods.base') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_evaluate_checkpoints_resolve_to_train_jobs_artifacts_or_paths(tmp_path: Path) -> None:
    from service.settings import Settings
    from workers.errors import UserError
    from workers.worker import resolve_checkpoints

    s = Settings(data_dir=tmp_path)
    (s.job_artifacts_dir("t1")).mkdir(parents=True)
    (s.job_artifacts_dir("t1") / "ensemble.pt").write_bytes(b"x")
    own = tmp_path / "mine.pt"
    own.write_bytes(b"y")
    got = resolve_checkpoints({"target_job": "t1", "transfer_from_checkpoint": str(own)}, s)
    assert got == {"target": str(s.job_artifacts_dir("t1") / "ensemble.pt"), "surrogate": str(own), "baseline": None}
    with pytest.raises(UserError, match="target_job: train job t2 has no ensemble.pt"):
        resolve_checkpoints({"target_job": "t2"}, s)
    with pytest.raises(UserError, match="baseline_checkpoint: no checkpoint file"):
        resolve_checkpoints({"target_job": "t1", "baseline_checkpoint": str(tmp_path / "nope.pt")}, s)


def test_train_results_show_the_start_up_breakdown() -> None:
    from service.report import format_train

    out = format_train({"metrics": {"test_clean_acc": 0.9},
                        "results": {"startup_s": {"prepare": 0.125, "data": 2.5, "total": 2.625}}})
    assert "start-up to the first step: 2.6250 s (prepare 0.1250, data 2.5000)" in out
    assert "start-up" not in format_train({"metrics": {"test_clean_acc": 0.9}, "results": {}})
