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


def _port(p: str | dict) -> dict:
    """A published port as long syntax (docker-compose v1 renders ``IP:PUBLISHED:TARGET/PROTO`` as a string)."""
    if isinstance(p, dict):
        return p
    *host, target = p.split("/")[0].split(":")
    return {"host_ip": host[0] if len(host) == 2 else None, "published": host[-1] if host else None,
            "target": int(target)}


def test_only_the_api_port_is_published() -> None:
    services = rendered("gpu")["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert list(published) == ["api"]
    assert [_port(p)["target"] for p in published["api"]] == [8000]


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


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = size.lower().rstrip("b")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def test_the_job_worker_runs_on_a_ray_node_of_its_own_container() -> None:
    """``ray.init(address=...)`` needs a Ray node in the driver's container: before, the worker called Ray
    from a container that ran none and restarted forever ("Failed to connect to Ray cluster at ray-head")."""
    worker = rendered()["services"]["worker"]
    command = " ".join(worker["command"])
    assert command.index("ray start --address=ray-head:6379") < command.index("robust-ensembles worker")
    assert "--num-cpus=0" in command and "--num-gpus=0" in command  # no training lands on the driver's node
    assert "--block" not in command.split("&&")[0]  # the node starts in the background, then the job worker runs
    assert "exec robust-ensembles worker --address ray-head:6379" in command


def test_every_ray_node_keeps_its_object_store_in_shared_memory() -> None:
    """An object store larger than the container's /dev/shm makes Ray fall back to /tmp (a warning per node)."""
    services = rendered("gpu")["services"]
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "worker"):
        command = " ".join(services[name]["command"])
        store = int(command.split("--object-store-memory=")[1].split()[0])
        assert 0 < store < _bytes(services[name]["shm_size"]), name


def test_the_api_port_is_published_on_loopback_unless_configured(tmp_path: Path) -> None:
    (port,) = map(_port, rendered()["services"]["api"]["ports"])
    assert port["host_ip"] == "127.0.0.1" and str(port["published"]) == "8000"
    env = (ROOT / ".env.example").read_text().replace("API_BIND=127.0.0.1", "API_BIND=0.0.0.0")
    (tmp_path / "all.env").write_text(env)
    out = subprocess.run(["docker-compose", "--env-file", str(tmp_path / "all.env"), "config"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    assert _port(yaml.safe_load(out)["services"]["api"]["ports"][0])["host_ip"] == "0.0.0.0"


def test_base_images_are_variables_with_the_public_images_as_defaults(tmp_path: Path) -> None:
    env = "\n".join(x for x in (ROOT / ".env.example").read_text().splitlines() if "_IMAGE=" not in x)
    (tmp_path / "bare.env").write_text(env + "\n")
    out = subprocess.run(["docker-compose", "--env-file", str(tmp_path / "bare.env"), "config"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    services = yaml.safe_load(out)["services"]
    assert services["postgres"]["image"] == "postgres:15"
    assert services["api"]["build"]["args"]["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    local = rendered()["services"]
    assert local["postgres"]["image"] == "postgres:15"  # .env.example names the public ones too
