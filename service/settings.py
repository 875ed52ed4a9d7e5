"""Settings from the environment (and CLI flags), with one data directory holding all local state.

Layout of the data directory (default ``~/.robust-ensembles``)::

    pg/                  embedded PostgreSQL cluster (when DATABASE_URL is not set)
    artifacts/<job_id>/  each job's files (ensemble.pt, results.json, plots)
    ray_storage/         Ray Train / Tune storage_path (run name = job id, so a re-leased job resumes)
    ray/                 Ray's temp dir for a local Ray started by ``robust-ensembles up`` / ``worker``
    models/<model_id>/   registered ensembles (config.json, model.safetensors; service.model_registry)
    logs/                process logs of ``robust-ensembles up``
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_DATA_DIR = "~/.robust-ensembles"


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 1/0 (true/false, on/off), got {raw!r}")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from e


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in os.environ.get(name, "").split(",") if v.strip())


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names a local `up` answers to with auth off


@dataclass(frozen=True)
class Settings:
    """Everything configurable. ``database_url`` None means: start the embedded PostgreSQL in ``data_dir/pg``."""

    data_dir: Path
    database_url: str | None = None
    artifacts_dir: Path | None = None  # default data_dir/artifacts
    ray_storage: Path | None = None  # default data_dir/ray_storage
    models_dir: Path | None = None  # registered models; default data_dir/models (shared with the workers)
    lease_seconds: float = 30.0  # a running job's lease; renewed by heartbeats
    heartbeat_seconds: float = 2.0  # also how often a worker sees a cancel request
    poll_seconds: float = 5.0  # fallback polling when no NOTIFY arrives
    retry_backoff_seconds: float = 10.0  # first retry delay; doubles per attempt
    retry_backoff_max_seconds: float = 600.0
    default_max_attempts: int = 3
    # infrastructure failures (lease expiry, InfrastructureError) a job may have; not charged to max_attempts
    max_infra_failures: int = 10
    leaderboard_path: Path | None = None  # GET /v1/leaderboard's document; default docs/results/leaderboard.json
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # Bearer-token authentication of /v1 (service.auth). Off in this dataclass (library use, tests);
    # load_settings reads RE_AUTH, whose default is on for `serve` and off for the local `up` / `demo`.
    auth: bool = False
    max_body_bytes: int = 1024 * 1024  # larger request bodies get 413 (RE_MAX_BODY_BYTES)
    max_model_bytes: int = 256 * 1024 * 1024  # a model upload's whole body (RE_MAX_MODEL_BYTES); over it: 413
    # Host names the API answers to while auth is off (DNS-rebinding protection, service.security); None
    # = no check (this dataclass's default, for library use and tests). load_settings gives the loopback
    # names plus RE_ALLOWED_HOSTS (comma-separated); `up` adds the address it listens on.
    allowed_hosts: tuple[str, ...] | None = None
    # Housekeeping (service.housekeeping): the worker's background thread that sends webhooks, applies the
    # owners' retention rules, removes orphaned job folders and asks for priority preemptions. Off in this
    # dataclass (library use, tests); load_settings turns it on unless RE_HOUSEKEEPING=0.
    housekeeping: bool = False
    retention_sweep_seconds: float = 3600.0  # how often retention and the orphan sweep run (RE_RETENTION_SWEEP_SECONDS)
    orphan_grace_seconds: float = 3600.0  # a job folder without a job is removed once unchanged this long
    # Priority preemption: a claimable job that has waited this long preempts a running train job of lower
    # priority at its next epoch checkpoint (None: never; RE_PREEMPT_AFTER_SECONDS).
    preempt_after_seconds: float | None = None
    # Webhooks (service.webhooks): delivery to loopback and private addresses only with this on
    # (RE_WEBHOOK_ALLOW_PRIVATE=1); link-local and cloud metadata addresses are refused always.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8  # then the delivery is 'failed' (its log says why)
    webhook_backoff_seconds: float = 10.0  # the first retry's delay; doubles per attempt
    webhook_backoff_max_seconds: float = 3600.0

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def ray_storage_path(self) -> Path:
        return self.ray_storage or self.data_dir / "ray_storage"

    @property
    def models_root(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    def job_artifacts_dir(self, job_id: str) -> Path:
        return self.artifacts_root / str(job_id)

    def with_(self, **kwargs: object) -> Settings:
        return replace(self, **kwargs)  # type: ignore[arg-type]


def load_settings(
    data_dir: str | os.PathLike[str] | None = None, database_url: str | None = None, *, auth_default: bool = False
) -> Settings:
    """Settings from ``RE_*`` environment variables and ``DATABASE_URL``; explicit arguments win.

    ``auth_default``: whether API tokens are required when ``RE_AUTH`` is not set (``serve``: yes;
    the local ``up`` / ``demo``: no)."""
    d = Path(data_dir or os.environ.get("RE_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    url = database_url or os.environ.get("DATABASE_URL") or None
    art = os.environ.get("RE_ARTIFACTS_DIR")
    storage = os.environ.get("RE_RAY_STORAGE")
    return Settings(
        data_dir=d,
        database_url=url,
        artifacts_dir=Path(art).expanduser().resolve() if art else None,
        ray_storage=Path(storage).expanduser().resolve() if storage else None,
        models_dir=Path(md).expanduser().resolve() if (md := os.environ.get("RE_MODELS_DIR")) else None,
        lease_seconds=_env_float("RE_LEASE_SECONDS", 30.0),
        heartbeat_seconds=_env_float("RE_HEARTBEAT_SECONDS", 2.0),
        poll_seconds=_env_float("RE_POLL_SECONDS", 5.0),
        retry_backoff_seconds=_env_float("RE_RETRY_BACKOFF_SECONDS", 10.0),
        retry_backoff_max_seconds=_env_float("RE_RETRY_BACKOFF_MAX_SECONDS", 600.0),
        default_max_attempts=int(_env_float("RE_MAX_ATTEMPTS", 3)),
        max_infra_failures=int(_env_float("RE_MAX_INFRA_FAILURES", 10)),
        leaderboard_path=Path(lb).expanduser().resolve() if (lb := os.environ.get("RE_LEADERBOARD_PATH")) else None,
        auth=_env_bool("RE_AUTH", auth_default),
        max_body_bytes=int(_env_float("RE_MAX_BODY_BYTES", 1024 * 1024)),
        max_model_bytes=int(_env_float("RE_MAX_MODEL_BYTES", 256 * 1024 * 1024)),
        allowed_hosts=(*LOCAL_HOSTS, *_env_list("RE_ALLOWED_HOSTS")),
        housekeeping=_env_bool("RE_HOUSEKEEPING", True),
        retention_sweep_seconds=_env_float("RE_RETENTION_SWEEP_SECONDS", 3600.0),
        orphan_grace_seconds=_env_float("RE_ORPHAN_GRACE_SECONDS", 3600.0),
        preempt_after_seconds=(_env_float("RE_PREEMPT_AFTER_SECONDS", 0.0)
                               if os.environ.get("RE_PREEMPT_AFTER_SECONDS", "").strip() else None),
        webhook_allow_private=_env_bool("RE_WEBHOOK_ALLOW_PRIVATE", False),
        webhook_timeout_seconds=_env_float("RE_WEBHOOK_TIMEOUT_SECONDS", 10.0),
        webhook_max_attempts=int(_env_float("RE_WEBHOOK_MAX_ATTEMPTS", 8)),
        webhook_backoff_seconds=_env_float("RE_WEBHOOK_BACKOFF_SECONDS", 10.0),
        webhook_backoff_max_seconds=_env_float("RE_WEBHOOK_BACKOFF_MAX_SECONDS", 3600.0),
    )
