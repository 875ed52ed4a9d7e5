"""docker-compose.yml: valid with the documented .env.example, and its security properties hold."""

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY_SERVICES = {"ray-head", "ray-worker", "ray-worker-gpu", "worker"}


def rendered(*profiles: str) -> dict:
    assert shutil.which("docker-compose"), "docker-compose is installed by `make install` (Debian package)"
    args = ["docker-compose", "--env-file", ".env.example"]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(out)


def test_only_the_api_port_is_published() -> None:
    services = rendered("gpu")["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert list(published) == ["api"]
    assert [p["target"] for p in published["api"]] == [8000]


def test_ray_token_auth_on_every_ray_process_and_one_shared_volume() -> None:
    services = rendered("gpu")["services"]
    assert set(services) >= RAY_SERVICES
    for name in RAY_SERVICES | {"api"}:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"], name
        vols = [v if isinstance(v, dict) else dict(zip(("source", "target"), v.split(":")[:2], strict=True))
                for v in services[name]["volumes"]]
        mounts = [v["target"] for v in vols if v["source"].endswith("shared")]
        assert mounts == ["/shared"], name  # the same path on every node: Ray Train's storage_path


def test_gpu_workers_reserve_one_gpu_each_and_only_under_the_profile() -> None:
    services = rendered("gpu")["services"]
    assert [n for n, s in services.items() if s.get("profiles")] == ["ray-worker-gpu"]
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"] == "robust-ensembles:cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--num-gpus=1" in " ".join(gpu["command"])


def test_secrets_are_required_not_defaulted(tmp_path: Path) -> None:
    (tmp_path / "empty.env").write_text("")
    r = subprocess.run(["docker-compose", "--env-file", str(tmp_path / "empty.env"), "config"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr
