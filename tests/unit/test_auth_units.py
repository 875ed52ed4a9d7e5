"""Fast checks of the security parts without a database: tokens, principals, server paths, NUL and
depth checks, the body-size middleware, settings, the client's header, spec bounds and checkpoints."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service.auth import LOCAL, Principal, generate_token, hash_token, server_path_errors, validate_owner
from service.client import Client
from service.limits import BodySizeLimit, nul_errors
from service.settings import Settings, load_settings
from service.submission import SpecError, validate_spec

ROOT = Path(__file__).resolve().parents[2]


def test_tokens_are_random_prefixed_and_hashed_with_sha256() -> None:
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    for t in tokens:
        assert re.fullmatch(r"re_[A-Za-z0-9_-]{43}", t), t
    t = next(iter(tokens))
    assert hash_token(t) == hashlib.sha256(t.encode()).hexdigest() and len(hash_token(t)) == 64
    assert hash_token(t) != hash_token(t + "x")


def test_owner_names_are_restricted() -> None:
    for ok in ("alice", "team-a", "a.b@c", "x" * 64, "0"):
        assert validate_owner(ok) == ok
    for bad in ("", " alice", "../x", "a/b", "x" * 65, "-lead", "a\x00", "ä"):
        with pytest.raises(ValueError, match="invalid owner"):
            validate_owner(bad)


def test_principals_see_their_own_jobs_and_admins_see_all() -> None:
    alice, admin = Principal("alice", "user"), Principal("ops", "admin")
    assert alice.can_see("alice") and not alice.can_see("bob") and not alice.can_see(None)
    assert admin.can_see("bob") and admin.can_see(None) and LOCAL.can_see("anyone")
    assert alice.list_filter == "alice" and admin.list_filter is None and LOCAL.list_filter is None


def test_server_paths_need_an_admin() -> None:
    alice = Principal("alice", "user")
    spec = {"target_checkpoint": "/x.pt", "baseline_checkpoint": "/y.pt", "transfer_from_job": "j"}
    assert [e["field"] for e in server_path_errors(alice, "evaluate", spec, ["spec"])] == [
        "spec.target_checkpoint", "spec.baseline_checkpoint"]
    assert [e["field"] for e in server_path_errors(alice, "tune", {"base": {"data_dir": "/d"}}, ["spec"])] == [
        "spec.base.data_dir"]
    assert server_path_errors(alice, "train", {"data_dir": None}, ["spec"]) == []
    assert server_path_errors(LOCAL, "evaluate", spec, ["spec"]) == []


def test_nul_characters_and_deep_nesting_are_found_with_their_location() -> None:
    assert [e["field"] for e in nul_errors({"a": ["ok", "b\x00"], "c": {"d": "\x00"}}, ["spec"])] == [
        "spec.c.d", "spec.a.1"]
    assert nul_errors({"a": [1, 2.0, None, True, "fine"]}, ["spec"]) == []
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    errors = nul_errors(deep, ["spec"])
    assert len(errors) == 1 and errors[0]["type"] == "too_deep"
    assert len(nul_errors({str(i): "\x00" for i in range(1000)}, ["spec"])) == 20  # capped


def _echo_app(limit: int) -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=limit)  # type: ignore[arg-type]
    return TestClient(app)


def test_body_size_limit_refuses_declared_and_streamed_bodies() -> None:
    c = _echo_app(1000)
    assert c.post("/echo", content=b"x" * 1000).json() == {"n": 1000}
    r = c.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json() == {"detail": "request body larger than 1000 bytes"}
    r = c.post("/echo", content=(b"y" * 300 for _ in range(4)))  # chunked: no Content-Length
    assert r.status_code == 413
    assert c.post("/echo", content=(b"y" * 300 for _ in range(3))).json() == {"n": 900}
    r = c.post("/echo", content=b"x", headers={"Content-Length": "nope"})
    assert r.status_code == 400


def test_settings_auth_defaults_on_for_serve_and_off_for_local_use(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("RE_AUTH", raising=False)
    assert Settings(data_dir=tmp_path).auth is False  # library and test construction
    assert load_settings(tmp_path).auth is False and load_settings(tmp_path, auth_default=True).auth is True
    monkeypatch.setenv("RE_AUTH", "0")
    assert load_settings(tmp_path, auth_default=True).auth is False
    monkeypatch.setenv("RE_AUTH", "on")
    assert load_settings(tmp_path).auth is True
    monkeypatch.setenv("RE_AUTH", "maybe")
    with pytest.raises(ValueError, match="RE_AUTH"):
        load_settings(tmp_path)
    monkeypatch.delenv("RE_AUTH")
    monkeypatch.setenv("RE_MAX_BODY_BYTES", "2048")
    assert load_settings(tmp_path).max_body_bytes == 2048


def test_client_sends_the_bearer_token_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RE_API_TOKEN", raising=False)
    with Client("http://x") as c:
        assert "authorization" not in c.http.headers
    with Client("http://x", token="re_abc") as c:
        assert c.http.headers["authorization"] == "Bearer re_abc"
    monkeypatch.setenv("RE_API_TOKEN", "re_env\n")
    with Client("http://x") as c:
        assert c.http.headers["authorization"] == "Bearer re_env"


def test_cli_parses_token_commands_and_client_token_flag() -> None:
    from service.cli import build_parser

    p = build_parser()
    a = p.parse_args(["token", "create", "--owner", "alice", "--admin"])
    assert a.token_command == "create" and a.owner == "alice" and a.admin and callable(a.func)
    assert p.parse_args(["token", "list", "--all"]).all
    assert p.parse_args(["token", "revoke", "re_abcdef"]).token_id == "re_abcdef"
    assert p.parse_args(["status", "--token", "re_x"]).token == "re_x"


@pytest.mark.parametrize(("kind", "spec", "field"), [
    ("train", {"members": 17}, "spec.members"),
    ("train", {"epochs": 1001}, "spec.epochs"),
    ("train", {"batch_size": 8193}, "spec.batch_size"),
    ("train", {"workers": 65}, "spec.workers"),
    ("train", {"train_subset": 1_000_001}, "spec.train_subset"),
    ("train", {"schedule": {"warmup_epochs": 10**6}}, "spec.schedule.warmup_epochs"),
    ("train", {"optimizer": {"betas": [0.9, 5.0]}}, "spec.optimizer.betas.1"),
    ("evaluate", {"target_job": "j", "n_examples": 10_001}, "spec.n_examples"),
    ("evaluate", {"target_job": "j", "attacks": [{"steps": 10_001}]}, "spec.attacks.0.steps"),
    ("evaluate", {"target_job": "j", "attacks": [{"restarts": 101}]}, "spec.attacks.0.restarts"),
    ("evaluate", {"target_job": "j", "attacks": [{"eps": [65]}]}, "spec.attacks.0.eps.0"),
    ("evaluate", {"target_job": "j", "attacks": [{"name": "square", "n_queries": 10**6}]}, "spec.attacks.0.n_queries"),
    ("evaluate", {"target_job": "j", "attacks": [{}] * 33}, "spec.attacks"),
    ("evaluate", {"target_job": "j", "member_transfer": {"steps": 10**5}}, "spec.member_transfer.steps"),
    ("evaluate", {"target_job": "j", "checks": {"n_examples": 10**5}}, "spec.checks.n_examples"),
    ("tune", {"base": {}, "search_space": {"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
              "num_samples": 257}, "spec.num_samples"),
    ("tune", {"base": {}, "search_space": {"lr": {"type": "grid", "values": [1e-3, 2e-3]}}, "num_samples": 513},
     "spec.num_samples"),
    ("tune", {"base": {}, "search_alg": "grid", "search_space": {
        "lr": {"type": "grid", "values": [i / 1e4 + 1e-4 for i in range(100)]},
        "hyperparameters.label_smoothing": {"type": "grid", "values": [i / 100 for i in range(11)]}}},
     "spec.num_samples"),
    ("tune", {"base": {}, "search_space": {"lr": {"type": "choice", "values": [1e-3] * 257}}},
     "spec.search_space.lr.values"),
    ("tune", {"base": {}, "search_space": {"lr": {"type": "randint", "low": "-inf", "high": 3}}},
     "spec.search_space.lr.low"),
    ("tune", {"base": {"members": 2}, "search_space": {"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
              "robust": {"steps": 101}}, "spec.robust.steps"),
    ("tune", {"base": {"epochs": 10**4}, "search_space": {"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}}},
     "spec.base.epochs"),
])
def test_every_work_field_is_bounded_and_the_error_names_it(kind: str, spec: dict, field: str) -> None:
    with pytest.raises(SpecError) as e:
        validate_spec(kind, spec)
    assert field in [x["field"] for x in e.value.errors], e.value.errors


def test_the_largest_allowed_grid_still_validates() -> None:
    spec = {"base": {}, "search_alg": "grid", "num_samples": 1, "search_space": {
        "lr": {"type": "grid", "values": [i / 1e4 + 1e-4 for i in range(100)]},
        "hyperparameters.label_smoothing": {"type": "grid", "values": [i / 100 for i in range(10)]}}}
    assert len(validate_spec("tune", spec)["search_space"]["lr"]["values"]) == 100  # 1000 trials <= 1024


def test_every_torch_load_in_the_code_base_is_weights_only() -> None:
    calls = []
    for package in ("ensemble_core", "service", "workers", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            src = path.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
                calls.append((path.relative_to(ROOT).as_posix(), m.group(1)))
    assert calls, "expected at least ensemble_core/checkpoint.py"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert unsafe == [], unsafe


def test_a_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    import torch

    from ensemble_core.checkpoint import load_checkpoint, load_ensemble

    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    evil = tmp_path / "ensemble.pt"
    torch.save({"format": "robust-ensembles/checkpoint-v1", "spec": "{}", "payload": Evil()}, evil)
    for load in (load_checkpoint, load_ensemble):
        with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
            load(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the same file unpickled unsafely would have run the payload
    assert marker.exists()
