"""Per-owner policies (migration 0007): retention rules, set by the owner, and quotas, set by an admin.

One row of ``owner_policies`` per owner key: the owner's name, ``''`` for the jobs of the local mode
(authentication off, no owner), and ``'*'`` for the defaults every owner without a value of its own gets.

- Retention (:mod:`service.cleanup`): ``keep_days`` (finished jobs older than that many days are deleted) and
  ``keep_last`` (only the newest that many finished jobs are kept); jobs tagged ``keep`` are never deleted by
  retention, nor jobs a queued or running job depends on.
- Quotas (enforced when a worker claims a job, :meth:`service.queue.Queue.claim`): ``max_running`` (jobs
  running at once) and ``max_gpus`` (GPUs reserved at once by running jobs, from :func:`job_gpus`). A job over
  its owner's quota stays queued and its ``waiting_reason`` says why.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, text

DEFAULT_KEY = "*"
RETENTION_FIELDS = ("keep_days", "keep_last")
QUOTA_FIELDS = ("max_running", "max_gpus")
POLICY_FIELDS = RETENTION_FIELDS + QUOTA_FIELDS
KEEP_TAG = "keep"  # jobs with this tag are exempt from retention


def owner_key(owner: str | None) -> str:
    """The policy key of an owner (``''`` for the jobs without one)."""
    return owner or ""


def job_gpus(kind: str, spec: Mapping[str, Any]) -> float:
    """The GPUs a job reserves while it runs, from its resolved spec: train and evaluate jobs one per Ray worker
    with ``use_gpu``; a tune job ``gpus_per_trial`` (or, with a GPU base spec, its workers) times
    ``max_concurrent_trials``."""
    if kind in ("train", "evaluate"):
        return float(spec.get("workers") or 1) if spec.get("use_gpu") else 0.0
    if kind == "tune":
        base = spec.get("base") if isinstance(spec.get("base"), dict) else {}
        per_trial = float(spec.get("gpus_per_trial") or 0.0)
        if per_trial <= 0 and base.get("use_gpu"):
            per_trial = float(base.get("workers") or 1)
        value = per_trial * int(spec.get("max_concurrent_trials") or 1)
        return float(math.ceil(value * 1000) / 1000)
    return 0.0


class PolicyStore:
    """The ``owner_policies`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _rows(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT owner_key, keep_days, keep_last, max_running, max_gpus, updated_at "
                                  "FROM owner_policies WHERE owner_key = ANY(:keys)"), {"keys": keys}).all()
        return {r.owner_key: dict(r._mapping) for r in rows}

    def get(self, key: str) -> dict[str, Any]:
        """``{"own": {...}, "defaults": {...}, "effective": {...}}`` for one owner key: its own values, the
        defaults (``'*'``) and what applies (its own value, else the default; None = no rule / no limit)."""
        rows = self._rows([key, DEFAULT_KEY])
        own = {f: (rows.get(key) or {}).get(f) for f in POLICY_FIELDS}
        defaults = {f: (rows.get(DEFAULT_KEY) or {}).get(f) for f in POLICY_FIELDS}
        effective = {f: own[f] if own[f] is not None else defaults[f] for f in POLICY_FIELDS}
        return {"own": own, "defaults": defaults, "effective": effective}

    def set(self, key: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set the given fields of one owner key (None clears a field); the others stay as they are."""
        unknown = set(values) - set(POLICY_FIELDS)
        if unknown:
            raise ValueError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        if values:
            cols = list(values)
            sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
            with self.engine.begin() as c:
                c.execute(text(f"INSERT INTO owner_policies (owner_key, {', '.join(cols)}) VALUES (:key, "
                               f"{', '.join(':' + c for c in cols)}) ON CONFLICT (owner_key) DO UPDATE SET {sets}, "
                               "updated_at = now()"), {"key": key, **values})
        return self.get(key)

    def all(self) -> list[dict[str, Any]]:
        """Every row, the defaults first."""
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT owner_key, keep_days, keep_last, max_running, max_gpus, updated_at "
                                  "FROM owner_policies ORDER BY owner_key <> '*', owner_key")).all()
        return [dict(r._mapping) for r in rows]

    def quota_block(self, owner: str | None, gpus: float = 0.0) -> str | None:
        """Why a job of ``owner`` needing ``gpus`` could not start now (None: it could)."""
        with self.engine.connect() as c:
            return c.execute(text("SELECT re_quota_block(CAST(:o AS text), CAST(:g AS float8))"),
                             {"o": owner, "g": gpus}).scalar()


__all__ = ["DEFAULT_KEY", "KEEP_TAG", "POLICY_FIELDS", "QUOTA_FIELDS", "RETENTION_FIELDS", "PolicyStore", "job_gpus",
           "owner_key"]
