"""Clean-up: deleting jobs with their files, retention per owner, orphaned folders, disk usage per owner.

A job's files are ``<artifacts>/<job id>/`` (results, plots, ``ensemble.pt``, TensorBoard logs) and
``<ray storage>/<job id>/`` (Ray Train / Tune run state and checkpoints). Deletion is **rows first, then
files**: the job's rows (and its trials', events', metrics' and log lines', by foreign-key cascade) are deleted
in one transaction; only after it committed are the folders removed. A process that dies in between leaves
folders without a job, never a job without its files; :func:`sweep_orphans` removes such folders (only names
that are job ids, only ones older than a grace period), and the worker's housekeeping runs it periodically.

A job that is running (or cancelling) cannot be deleted (:class:`JobBusy`, 409): cancel it first. The job's
row is locked (``FOR UPDATE``) while it is checked and deleted, so no worker can claim a queued job being
deleted. Jobs that depend on it (evaluations of a train job, ``depends_on``):

- running ones: the deletion is refused (409 naming them);
- queued ones can never run: they are cancelled, saying why (or deleted too with ``cascade``);
- finished ones keep their own results and files (or are deleted too with ``cascade``).

Registered models keep their weights (their ``source_job_id`` becomes null).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from service.policies import DEFAULT_KEY, KEEP_TAG, PolicyStore, owner_key
from service.queue import JobNotFound
from service.settings import Settings

log = logging.getLogger(__name__)

UUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ACTIVE = ("running", "cancelling")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_CASCADE_DEPTH = 50


class JobBusy(Exception):
    """The job (or a job depending on it) is running: it cannot be deleted now (409)."""


@dataclass
class DeleteReport:
    """What :func:`delete_job` did."""

    id: str
    deleted: list[str] = field(default_factory=list)  # job ids (the job, then dependents deleted with cascade)
    trials: int = 0  # trial rows deleted with their tune jobs
    dependents_cancelled: list[str] = field(default_factory=list)  # queued dependents that can never run now
    dependents_kept: list[str] = field(default_factory=list)  # finished dependents, kept with their results
    freed_bytes: int = 0
    files_left: list[str] = field(default_factory=list)  # folders that could not be removed (the sweep retries)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_folders(settings: Settings, job_id: str | uuid.UUID) -> list[Path]:
    """Every folder that holds files of a job."""
    return [settings.job_artifacts_dir(str(job_id)), settings.ray_storage_path / str(job_id)]


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symbolic links neither counted nor followed)."""
    total = 0
    try:
        st = path.lstat()
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                fst = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(fst.st_mode):
                total += fst.st_size
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return total


def remove_folder(path: Path) -> bool:
    """Remove a folder (or a stray file or link) at ``path``; True when nothing is left there."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)
    return not os.path.lexists(path)


def delete_job(engine: Engine, settings: Settings, job_id: uuid.UUID, *, cascade: bool = False) -> DeleteReport:
    """Delete a finished or queued job with its files (rows in one transaction, then the folders).

    :class:`JobNotFound` when it does not exist; :class:`JobBusy` when it, or a job depending on it, is running,
    and for a trial (trials are deleted with their tune job). See the module docstring for dependents."""
    report = DeleteReport(id=str(job_id))
    with engine.begin() as c:
        row = c.execute(text("SELECT id, status, kind FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id}).first()
        if row is None:
            raise JobNotFound(str(job_id))
        if row.kind == "trial":
            raise JobBusy(f"job {job_id} is a trial of a tune job; delete the tune job")
        if row.status in ACTIVE:
            raise JobBusy(f"job {job_id} is {row.status}; cancel it first (POST /v1/jobs/{job_id}/cancel), then "
                          "delete it once it has stopped")
        ids: list[uuid.UUID] = [job_id]
        frontier = [job_id]
        for _ in range(MAX_CASCADE_DEPTH):
            deps = c.execute(text("SELECT id, status FROM jobs WHERE depends_on && CAST(:ids AS uuid[]) "
                                  "AND NOT (id = ANY(CAST(:seen AS uuid[]))) ORDER BY seq FOR UPDATE"),
                             {"ids": frontier, "seen": ids}).all()
            busy = [d for d in deps if d.status in ACTIVE]
            if busy:
                raise JobBusy(f"job {busy[0].id} depends on job {job_id} and is {busy[0].status}; cancel it first"
                              + ("" if len(busy) == 1 else f" (and {len(busy) - 1} more)"))
            if not deps:
                break
            if not cascade:
                queued = [d.id for d in deps if d.status == "queued"]
                if queued:
                    c.execute(text("UPDATE jobs SET status = 'cancelled', cancel_requested = true, error = :why "
                                   "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'"),
                              {"ids": queued, "why": f"cancelled: its dependency {job_id} was deleted"})
                report.dependents_cancelled = [str(i) for i in queued]
                report.dependents_kept = [str(d.id) for d in deps if d.status in FINISHED]
                break
            frontier = [d.id for d in deps]
            ids += frontier
        report.trials = int(c.execute(text("SELECT count(*) FROM jobs WHERE parent_id = ANY(CAST(:ids AS uuid[]))"),
                                      {"ids": ids}).scalar_one())
        c.execute(text("DELETE FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids})
    report.deleted = [str(i) for i in ids]
    # committed: only now the files (a crash from here on leaves folders that sweep_orphans removes)
    for jid in ids:
        for folder in job_folders(settings, jid):
            size = dir_size(folder)
            if remove_folder(folder):
                report.freed_bytes += size
            else:
                report.files_left.append(str(folder))
    log.info("deleted job(s) %s (%d trial rows), freed %d bytes", ", ".join(report.deleted), report.trials,
             report.freed_bytes)
    return report


# ------------------------------------------------------------------ retention
SQL_RETENTION = f"""
WITH mine AS (
    SELECT j.id, j.finished_at,
           row_number() OVER (ORDER BY j.finished_at DESC NULLS LAST, j.seq DESC) AS rank
    FROM jobs j
    WHERE COALESCE(j.owner, '') = :key AND j.kind <> 'trial' AND j.status IN {FINISHED!r}
      AND NOT ('{KEEP_TAG}' = ANY(j.tags))
)
SELECT m.id FROM mine m
WHERE ((CAST(:days AS integer) IS NOT NULL AND m.finished_at < now() - make_interval(days => CAST(:days AS integer)))
       OR (CAST(:last AS integer) IS NOT NULL AND m.rank > CAST(:last AS integer)))
  AND NOT EXISTS (SELECT 1 FROM jobs d WHERE m.id = ANY(d.depends_on) AND d.status NOT IN {FINISHED!r})
ORDER BY m.rank DESC"""


def retention_candidates(engine: Engine, key: str, keep_days: int | None, keep_last: int | None) -> list[uuid.UUID]:
    """The finished jobs of one owner key that its retention rules remove, oldest first: finished more than
    ``keep_days`` days ago, or beyond the newest ``keep_last`` (jobs tagged ``keep`` neither count nor go; jobs
    a queued or running job depends on stay)."""
    if keep_days is None and keep_last is None:
        return []
    with engine.connect() as c:
        return list(c.execute(text(SQL_RETENTION), {"key": key, "days": keep_days, "last": keep_last}).scalars())


def _retention_keys(engine: Engine, store: PolicyStore) -> list[str]:
    """Owner keys that have a retention rule (their own, or the defaults when those have one)."""
    rows = store.all()
    defaults = next((r for r in rows if r["owner_key"] == DEFAULT_KEY), None)
    keys = {r["owner_key"] for r in rows if r["owner_key"] != DEFAULT_KEY
            and (r["keep_days"] is not None or r["keep_last"] is not None)}
    if defaults is not None and (defaults["keep_days"] is not None or defaults["keep_last"] is not None):
        with engine.connect() as c:
            keys |= set(c.execute(text("SELECT DISTINCT COALESCE(owner, '') FROM jobs")).scalars())
    return sorted(keys)


def apply_retention(engine: Engine, settings: Settings, *, keys: Iterable[str] | None = None,
                    dry_run: bool = False) -> list[dict[str, Any]]:
    """Apply the retention rules of the given owner keys (default: every key with a rule). Returns one entry per
    key: its rules, the jobs selected and (unless ``dry_run``) deleted, and the bytes freed."""
    store = PolicyStore(engine)
    out = []
    for key in (list(keys) if keys is not None else _retention_keys(engine, store)):
        rules = store.get(key)["effective"]
        candidates = retention_candidates(engine, key, rules["keep_days"], rules["keep_last"])
        entry: dict[str, Any] = {"owner": key or None, "keep_days": rules["keep_days"],
                                 "keep_last": rules["keep_last"], "selected": [str(i) for i in candidates],
                                 "deleted": [], "freed_bytes": 0, "skipped": []}
        for jid in [] if dry_run else candidates:
            try:
                report = delete_job(engine, settings, jid)
            except (JobNotFound, JobBusy) as e:  # deleted or started meanwhile
                entry["skipped"].append({"id": str(jid), "reason": str(e)})
                continue
            entry["deleted"] += report.deleted
            entry["freed_bytes"] += report.freed_bytes
        out.append(entry)
    return out


# ------------------------------------------------------------------ orphans
def sweep_orphans(engine: Engine, settings: Settings, *, grace_seconds: float = 3600.0,
                  dry_run: bool = False) -> list[str]:
    """Remove job folders (names that are job ids) under the artifacts and Ray storage roots whose job no longer
    exists and which have not changed for ``grace_seconds``. Returns the folders removed (or, with ``dry_run``,
    that would be)."""
    found: dict[str, list[Path]] = {}
    for root in (settings.artifacts_root, settings.ray_storage_path):
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            if UUID_NAME.match(entry.name):
                found.setdefault(entry.name, []).append(Path(entry.path))
    if not found:
        return []
    with engine.connect() as c:
        existing = {str(i) for i in c.execute(text("SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                                              {"ids": list(found)}).scalars()}
    cutoff = time.time() - grace_seconds
    removed = []
    for name, paths in found.items():
        if name in existing:
            continue
        for p in paths:
            try:
                if p.lstat().st_mtime > cutoff:
                    continue
            except OSError:
                continue
            if dry_run or remove_folder(p):
                removed.append(str(p))
    if removed and not dry_run:
        log.info("removed %d orphaned job folder(s)", len(removed))
    return removed


# ------------------------------------------------------------------ usage
def usage(engine: Engine, settings: Settings, owner: str | None, *, top: int = 10) -> dict[str, Any]:
    """Disk use and job counts of one owner: bytes of artifacts, of Ray run state and checkpoints, of registered
    models; jobs per status; the largest jobs; its retention rules and quotas."""
    key = owner_key(owner)
    with engine.connect() as c:
        counts = {r.status: int(r.n) for r in c.execute(text(
            "SELECT status, count(*) AS n FROM jobs WHERE COALESCE(owner, '') = :key AND kind <> 'trial' "
            "GROUP BY status"), {"key": key})}
        ids = list(c.execute(text("SELECT id FROM jobs WHERE COALESCE(owner, '') = :key AND kind <> 'trial' "
                                  "ORDER BY seq"), {"key": key}).scalars())
        models = c.execute(text("SELECT count(*) AS n, COALESCE(sum(size_bytes), 0) AS b FROM models "
                                "WHERE COALESCE(owner, '') = :key"), {"key": key}).one()
        running = c.execute(text("SELECT count(*) AS n, COALESCE(sum(gpus), 0) AS g FROM jobs WHERE "
                                 "COALESCE(owner, '') = :key AND kind <> 'trial' AND status IN ('running', "
                                 "'cancelling')"), {"key": key}).one()
    per_job = []
    artifacts = checkpoints = 0
    for jid in ids:
        a = dir_size(settings.job_artifacts_dir(str(jid)))
        k = dir_size(settings.ray_storage_path / str(jid))
        artifacts += a
        checkpoints += k
        if a + k:
            per_job.append({"id": str(jid), "bytes": a + k, "artifacts_bytes": a, "checkpoints_bytes": k})
    per_job.sort(key=lambda r: -r["bytes"])
    policy = PolicyStore(engine).get(key)["effective"]
    return {
        "owner": owner,
        "jobs": {"total": sum(counts.values()), "by_status": counts},
        "artifacts_bytes": artifacts,
        "checkpoints_bytes": checkpoints,
        "models": {"count": int(models.n), "bytes": int(models.b)},
        "total_bytes": artifacts + checkpoints + int(models.b),
        "largest_jobs": per_job[:top],
        "running": {"jobs": int(running.n), "gpus": float(running.g)},
        "retention": {f: policy[f] for f in ("keep_days", "keep_last")},
        "quota": {f: policy[f] for f in ("max_running", "max_gpus")},
    }


__all__ = ["DeleteReport", "JobBusy", "apply_retention", "delete_job", "dir_size", "job_folders", "remove_folder",
           "retention_candidates", "sweep_orphans", "usage"]
