"""The job queue in PostgreSQL: submission, claims, leases, heartbeats, retries, cancellation, sweeps.

Every status change is one guarded ``UPDATE ... WHERE status IN (<expected>)`` statement, so two
actors can never both win a transition; a trigger (migration 0001) records each transition in
``job_events`` and sends ``NOTIFY re_jobs`` / ``re_cancel``. Worker-side statements are fenced by
``(lease_owner, attempts)``: a worker whose lease expired and whose job was re-claimed (even by
itself) can no longer change the job.

Claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` over the partial index of queued rows, so any
number of concurrent claimers never get the same job and never wait on each other.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

from service.models import CLAIMABLE_KINDS, JOB_KINDS, JOB_STATUSES, TERMINAL_STATUSES

JOB_COLUMNS = """id, seq, kind, status, priority, spec, error, progress, stage, epoch, total_epochs, attempts,
    max_attempts, run_after, lease_owner, lease_expires_at, heartbeat_at, cancel_requested, idempotency_key,
    request_hash, depends_on, parent_id, created_at, updated_at, started_at, finished_at,
    (result IS NOT NULL) AS has_result, owner, deadline_seconds, infra_failures, tags, note, gpus, preempt_requested,
    preempted_by, preemptions,
    CASE WHEN status = 'queued' THEN re_waiting_reason(kind, depends_on, run_after, owner, gpus) END
    AS waiting_reason"""

MAX_CLAIM_ROUNDS = 20  # owners skipped at their quota within one claim before it gives up for now

# Exponential backoff, in SQL: base * 2^(n-1) seconds, capped; n counts the failures of one class.
def _backoff(n: str) -> str:
    return f"make_interval(secs => LEAST(:backoff_base * power(2, GREATEST({n} - 1, 0)), :backoff_max))"


# Attempts charged to the job's retry budget: infrastructure failures (migration 0004) are not.
CHARGED = "(attempts - infra_failures)"
BACKOFF = _backoff(CHARGED)

# Worker-side statements only touch the job while this worker's lease (owner + attempt) holds.
FENCE = "id = :id AND lease_owner = :owner AND attempts = :attempt AND status IN ('running', 'cancelling')"

SQL_SUBMIT = f"""
INSERT INTO jobs (id, kind, status, spec, priority, max_attempts, idempotency_key, request_hash, depends_on,
                  parent_id, owner, deadline_seconds, tags, note, gpus)
VALUES (:id, :kind, :status, CAST(:spec AS jsonb), :priority, :max_attempts, :key, :hash, CAST(:deps AS uuid[]),
        :parent, :owner, :deadline, CAST(:tags AS text[]), :note, :gpus)
ON CONFLICT (COALESCE(owner, ''), idempotency_key) WHERE idempotency_key IS NOT NULL AND kind <> 'trial'
DO NOTHING
RETURNING {JOB_COLUMNS}"""

SQL_CANCEL = f"""
UPDATE jobs SET cancel_requested = true,
       status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE 'cancelling' END,
       error = CASE WHEN status = 'queued' THEN :reason ELSE error END
WHERE id = :id AND status IN ('queued', 'running')
RETURNING {JOB_COLUMNS}"""

# The claim, in one transaction: the next candidate (queued, due, every dependency succeeded, its owner within
# its quota; FOR UPDATE SKIP LOCKED), then the owner's quota re-checked under a per-owner advisory lock (two
# claimers of one owner's jobs cannot both pass a count neither has committed yet), then the transition.
SQL_CLAIM_CANDIDATE = """
SELECT j.id, j.owner, j.gpus FROM jobs j
WHERE j.status = 'queued' AND j.kind <> 'trial' AND j.kind = ANY(:kinds) AND j.run_after <= now()
  AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.id = ANY(j.depends_on) AND d.status <> 'succeeded')
  AND NOT (COALESCE(j.owner, '') = ANY(:skip))
  AND re_quota_block(j.owner, j.gpus) IS NULL
ORDER BY j.priority DESC, j.seq
LIMIT 1
FOR UPDATE OF j SKIP LOCKED"""

SQL_QUOTA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('re_quota:' || COALESCE(CAST(:owner AS text), '')))"
SQL_QUOTA_BLOCK = "SELECT re_quota_block(CAST(:owner AS text), CAST(:gpus AS float8))"

SQL_CLAIM_TAKE = """
UPDATE jobs SET status = 'running', attempts = jobs.attempts + 1, lease_owner = :owner,
       lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now(), progress = 0,
       preempt_requested = false, preempted_by = NULL
WHERE jobs.id = :id
RETURNING jobs.id, jobs.kind, jobs.spec, jobs.attempts, jobs.max_attempts, jobs.depends_on,
    CASE WHEN jobs.deadline_seconds IS NOT NULL  -- (GREATEST would turn NULL, no deadline, into 0)
         THEN GREATEST(jobs.deadline_seconds - EXTRACT(EPOCH FROM now() - jobs.started_at)::float8, 0) END
    AS deadline_left"""

SQL_HEARTBEAT = f"""
UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now()
WHERE {FENCE}
RETURNING cancel_requested, preempt_requested"""

# A preempted run goes back to the queue at once, its attempt not counted (like a release); the events
# trigger records it as 'preempted' (preemptions + 1). A cancel requested meanwhile wins.
SQL_PREEMPTED = f"""
UPDATE jobs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
       attempts = CASE WHEN cancel_requested THEN attempts ELSE attempts - 1 END,
       preemptions = CASE WHEN cancel_requested THEN preemptions ELSE preemptions + 1 END,
       preempt_requested = false, error = :reason, lease_expires_at = NULL, run_after = now()
WHERE {FENCE}
RETURNING status"""

# Priority preemption: the first claimable queued job (by priority) that has waited :after seconds, and a
# running train job of lower priority (the lowest, the most recently started first) asked to stop at its
# next epoch checkpoint. One request at a time: none while another preemption is pending.
SQL_REQUEST_PREEMPTION = """
WITH waiting AS (
    SELECT j.id, j.priority FROM jobs j
    WHERE j.status = 'queued' AND j.kind <> 'trial' AND j.kind = ANY(:kinds)
      AND GREATEST(j.run_after, j.created_at) <= now() - make_interval(secs => :after)
      AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.id = ANY(j.depends_on) AND d.status <> 'succeeded')
      AND re_quota_block(j.owner, j.gpus) IS NULL
    ORDER BY j.priority DESC, j.seq
    LIMIT 1
), victim AS (
    SELECT r.id FROM jobs r, waiting w
    WHERE r.status = 'running' AND r.kind = 'train' AND r.priority < w.priority AND NOT r.preempt_requested
      AND NOT r.cancel_requested
      AND NOT EXISTS (SELECT 1 FROM jobs p WHERE p.status = 'running' AND p.preempt_requested)
    ORDER BY r.priority, r.started_at DESC
    LIMIT 1
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE jobs SET preempt_requested = true, preempted_by = w.id
FROM victim v, waiting w
WHERE jobs.id = v.id
RETURNING jobs.id, w.id AS waiting_id"""

SQL_PROGRESS = f"""
UPDATE jobs SET progress = :p, stage = COALESCE(:stage, stage), epoch = COALESCE(:epoch, epoch),
       total_epochs = COALESCE(:total, total_epochs)
WHERE {FENCE}"""

SQL_SUCCEED = f"""
UPDATE jobs SET status = 'succeeded', result = CAST(:result AS jsonb), progress = 1, error = NULL,
       lease_expires_at = NULL
WHERE {FENCE}"""

SQL_FAIL = f"UPDATE jobs SET status = 'failed', error = :error, lease_expires_at = NULL WHERE {FENCE}"

SQL_CANCELLED = f"UPDATE jobs SET status = 'cancelled', error = :error, lease_expires_at = NULL WHERE {FENCE}"

SQL_RETRY = f"""
UPDATE jobs SET
    status = CASE WHEN cancel_requested THEN 'cancelled' WHEN {CHARGED} >= max_attempts THEN 'failed'
             ELSE 'queued' END,
    error = CASE WHEN {CHARGED} >= max_attempts AND NOT cancel_requested
            THEN :error || ' (attempt ' || {CHARGED} || ' of ' || max_attempts || '; no attempts left)'
            ELSE :error END,
    lease_expires_at = NULL, run_after = now() + {BACKOFF}
WHERE {FENCE}
RETURNING status"""

# An infrastructure failure: counted in infra_failures, not charged to max_attempts; capped by :max_infra.
# (SET expressions read the row as it was before the UPDATE.)
_INFRA_SET = f"""
    infra_failures = infra_failures + 1,
    status = CASE WHEN cancel_requested THEN 'cancelled' WHEN infra_failures + 1 >= :max_infra THEN 'failed'
             ELSE 'queued' END,
    error = {{cause}} || CASE WHEN cancel_requested THEN ''
            WHEN infra_failures + 1 >= :max_infra
            THEN ' (infrastructure failure ' || (infra_failures + 1) || ' of at most ' || :max_infra || '; none left)'
            ELSE ' (infrastructure failure ' || (infra_failures + 1) || ' of at most ' || :max_infra
                 || ', not charged to the job''s ' || max_attempts || ' attempts; retried after a backoff)' END,
    lease_expires_at = NULL, run_after = now() + {_backoff("(infra_failures + 1)")}"""

SQL_INFRA_RETRY = f"""
UPDATE jobs SET {_INFRA_SET.format(cause=":error")}
WHERE {FENCE}
RETURNING status"""

SQL_RELEASE = f"""
UPDATE jobs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
       attempts = CASE WHEN cancel_requested THEN attempts ELSE attempts - 1 END,
       error = :reason, lease_expires_at = NULL, run_after = now()
WHERE {FENCE}
RETURNING status"""

SQL_SWEEP = f"""
UPDATE jobs SET {_INFRA_SET.format(
    cause="'lease expired: worker ' || COALESCE(lease_owner, '?') || ' stopped heartbeating during attempt ' "
          "|| attempts")}
WHERE status IN ('running', 'cancelling') AND lease_expires_at < now()
RETURNING id, status"""

SQL_FAIL_BLOCKED = """
UPDATE jobs j SET status = 'failed',
       error = 'dependency ' || d.id || ' (' || d.kind || ') ended ' || d.status || COALESCE(': ' || d.error, '')
FROM jobs d
WHERE j.status = 'queued' AND d.id = ANY(j.depends_on) AND d.status IN ('failed', 'cancelled')"""

SQL_METRICS = """
INSERT INTO job_metrics (job_id, name, step, value, attempt) VALUES (:job, :name, :step, :value, :attempt)
ON CONFLICT (job_id, name, step) DO UPDATE SET value = EXCLUDED.value, attempt = EXCLUDED.attempt, at = EXCLUDED.at"""
SQL_METRICS_KEEP = """
INSERT INTO job_metrics (job_id, name, step, value, attempt) VALUES (:job, :name, :step, :value, :attempt)
ON CONFLICT (job_id, name, step) DO NOTHING"""

# A trial row is keyed by (parent tune job, trial key) in its own index (migration 0005), apart from the keys
# of submissions: the upsert can only ever match a trial row of the same tune job (the WHERE says so too).
SQL_TRIAL = """
INSERT INTO jobs (id, kind, status, spec, result, error, idempotency_key, parent_id, max_attempts, progress)
VALUES (:id, 'trial', :status, CAST(:spec AS jsonb), CAST(:result AS jsonb), :error, :key, :parent, 1, :progress)
ON CONFLICT (parent_id, idempotency_key) WHERE kind = 'trial' DO UPDATE SET
    status = EXCLUDED.status, spec = EXCLUDED.spec, result = EXCLUDED.result, error = EXCLUDED.error,
    progress = EXCLUDED.progress
WHERE jobs.kind = 'trial' AND jobs.parent_id = EXCLUDED.parent_id"""

# Idempotency keys of this form are the worker's own (trial rows); submissions may not use the prefix.
RESERVED_KEY_PREFIX = "trial:"


class JobNotFound(LookupError):
    pass


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different request")
        self.job_id = job_id


MAX_JOB_TAGS = 16  # the check constraint of migration 0007


class TooManyTags(ValueError):
    """A job would hold more than :data:`MAX_JOB_TAGS` tags."""


def like_escape(value: str) -> str:
    """``value`` as a literal inside an ``ILIKE ... ESCAPE '\\'`` pattern."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class InvalidTransition(Exception):
    """The job is not in a state that allows the operation (e.g. cancelling a succeeded job)."""


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job; the fencing token is (owner, attempt)."""

    job_id: uuid.UUID
    owner: str
    attempt: int
    kind: str
    spec: dict[str, Any]
    max_attempts: int
    depends_on: tuple[uuid.UUID, ...] = ()
    deadline_left: float | None = None  # seconds left before the job's deadline (None: no deadline)


@dataclass(frozen=True)
class Heartbeat:
    ok: bool  # False: the lease is lost (expired and re-queued, or the job was finished by someone else)
    cancel_requested: bool
    preempt_requested: bool = False  # a job of higher priority waits: stop at the next epoch checkpoint


def request_hash(kind: str, spec: Mapping[str, Any], priority: int, max_attempts: int | None,
                 deadline_seconds: float | None = None, tags: Sequence[str] = (), note: str | None = None) -> str:
    body: dict[str, Any] = {"kind": kind, "spec": spec, "priority": priority, "max_attempts": max_attempts}
    if deadline_seconds is not None:  # (absent when unset: hashes of earlier requests stay valid)
        body["deadline_seconds"] = deadline_seconds
    if tags:
        body["tags"] = list(tags)
    if note is not None:
        body["note"] = note
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _row(r: Any) -> dict[str, Any]:
    return dict(r._mapping)


def _json_default(o: Any) -> Any:
    if isinstance(o, uuid.UUID | datetime):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(value: Any) -> str:
    """JSON for a JSONB column: numpy/torch scalars become numbers; NaN/inf become null (JSON has neither)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(json.loads(json.dumps(value, default=_json_default))))


def trial_status(ray_status: str) -> str:
    """Ray Tune's trial states mapped onto job states."""
    return {"PENDING": "queued", "RUNNING": "running", "PAUSED": "queued", "TERMINATED": "succeeded",
            "ERROR": "failed"}.get(ray_status.upper(), "running" if ray_status else "queued")


class Queue:
    """All SQL of the queue. Thread-safe: each call takes its own pooled connection."""

    def __init__(self, engine: Engine, *, lease_seconds: float = 30.0, backoff_base: float = 10.0,
                 backoff_max: float = 600.0, default_max_attempts: int = 3, max_infra_failures: int = 10) -> None:
        if max_infra_failures < 1:
            raise ValueError(f"max_infra_failures must be at least 1, got {max_infra_failures}")
        self.engine = engine
        self.max_infra_failures = max_infra_failures
        self.lease_seconds = lease_seconds
        self.backoff = {"backoff_base": backoff_base, "backoff_max": backoff_max}
        self.default_max_attempts = default_max_attempts

    def _one(self, sql: str, params: Mapping[str, Any]) -> Any:
        with self.engine.begin() as c:
            return c.execute(text(sql), dict(params)).first()

    def _count(self, sql: str, params: Mapping[str, Any]) -> int:
        with self.engine.begin() as c:
            return int(c.execute(text(sql), dict(params)).rowcount)

    # ------------------------------------------------------------------ submission and reads
    def submit(self, kind: str, spec: Mapping[str, Any], *, priority: int = 0, max_attempts: int | None = None,
               idempotency_key: str | None = None, depends_on: Iterable[uuid.UUID] = (),
               parent_id: uuid.UUID | None = None, job_id: uuid.UUID | None = None,
               status: str = "queued", owner: str | None = None,
               deadline_seconds: float | None = None, tags: Sequence[str] = (), note: str | None = None,
               gpus: float = 0.0) -> tuple[dict[str, Any], bool]:
        """Insert a job; returns ``(job, created)``. A replayed ``idempotency_key`` returns the first job
        (:class:`IdempotencyConflict` when the replay's request differs); keys are scoped to the ``owner``
        (migration 0005: another owner's key is another key). ``owner``: the submitting
        token's owner (None with authentication off; a child job inherits its parent's).
        ``deadline_seconds``: the job fails, not retried, when it has not finished that long after its
        first start (the worker enforces it). ``tags`` and ``note``: the owner's organisation of its jobs;
        ``gpus``: the GPUs the job reserves while it runs (counted against its owner's ``max_gpus``)."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        rhash = (request_hash(kind, spec, priority, max_attempts, deadline_seconds, tags, note)
                 if idempotency_key else None)
        params = {"id": job_id or uuid.uuid4(), "kind": kind, "status": status, "spec": to_json(dict(spec)),
                  "priority": priority, "max_attempts": max_attempts or self.default_max_attempts,
                  "key": idempotency_key, "hash": rhash, "deps": list(dict.fromkeys(depends_on)),
                  "parent": parent_id, "owner": owner, "deadline": deadline_seconds, "tags": list(tags),
                  "note": note, "gpus": float(gpus)}
        with self.engine.begin() as c:
            row = c.execute(text(SQL_SUBMIT), params).first()
            if row is not None:
                return _row(row), True
            # ON CONFLICT waited for the other transaction to commit: the row with this key is visible now
            existing = c.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = :key AND "
                                      "COALESCE(owner, '') = COALESCE(CAST(:owner AS text), '') AND kind <> 'trial'"),
                                 {"key": idempotency_key, "owner": owner}).first()
        job = _row(existing)
        if job["request_hash"] != rhash:
            raise IdempotencyConflict(job["id"])
        return job, False

    def get(self, job_id: uuid.UUID) -> dict[str, Any]:
        row = self._one(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id", {"id": job_id})
        if row is None:
            raise JobNotFound(str(job_id))
        return _row(row)

    def result(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        row = self._one("SELECT result FROM jobs WHERE id = :id", {"id": job_id})
        if row is None:
            raise JobNotFound(str(job_id))
        return row.result

    def list(self, *, status: Sequence[str] = (), kind: Sequence[str] = (), parent_id: uuid.UUID | None = None,
             limit: int = 50, offset: int = 0, include_result: bool = False,
             owner: str | None = None, method: Sequence[str] = (), dataset: Sequence[str] = (),
             tags: Sequence[str] = (), search: str | None = None, since: datetime | None = None,
             until: datetime | None = None) -> tuple[list[dict[str, Any]], int]:
        """Newest first. Without ``parent_id``, trials are left out unless ``kind`` asks for them.
        With ``owner``, only that owner's jobs (tenancy; None = every job).

        Filters: ``method`` / ``dataset`` (a train job's, or a tune job's base spec's; any of them), ``tags``
        (the job has every one), ``search`` (case-insensitive substring of the job's id, note, tags, error, owner,
        idempotency key or spec), ``since`` / ``until`` (created at or after / before)."""
        where: list[str] = []
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if owner is not None:
            where.append("owner = :owner")
            params["owner"] = owner
        if status:
            where.append("status = ANY(:status)")
            params["status"] = list(status)
        if kind:
            where.append("kind = ANY(:kind)")
            params["kind"] = list(kind)
        if method:
            where.append("COALESCE(spec->>'method', spec->'base'->>'method') = ANY(:method)")
            params["method"] = list(method)
        if dataset:
            where.append("COALESCE(spec->>'dataset', spec->'base'->>'dataset') = ANY(:dataset)")
            params["dataset"] = list(dataset)
        if tags:
            where.append("tags @> CAST(:tags AS text[])")
            params["tags"] = list(tags)
        if search:
            where.append("(id::text ILIKE :search ESCAPE '\\' OR COALESCE(note, '') ILIKE :search ESCAPE '\\' "
                         "OR array_to_string(tags, ' ') ILIKE :search ESCAPE '\\' "
                         "OR COALESCE(error, '') ILIKE :search ESCAPE '\\' "
                         "OR COALESCE(owner, '') ILIKE :search ESCAPE '\\' "
                         "OR COALESCE(idempotency_key, '') ILIKE :search ESCAPE '\\' "
                         "OR spec::text ILIKE :search ESCAPE '\\')")
            params["search"] = "%" + like_escape(search) + "%"
        if since is not None:
            where.append("created_at >= :since")
            params["since"] = since
        if until is not None:
            where.append("created_at < :until")
            params["until"] = until
        if parent_id is not None:
            where.append("parent_id = :parent")
            params["parent"] = parent_id
        elif "trial" not in kind:
            where.append("kind <> 'trial'")
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        cols = JOB_COLUMNS + (", result" if include_result else "")
        with self.engine.connect() as c:
            total = c.execute(text(f"SELECT count(*) FROM jobs {cond}"), params).scalar_one()
            rows = c.execute(text(f"SELECT {cols} FROM jobs {cond} ORDER BY seq DESC LIMIT :limit OFFSET :offset"),
                             params).all()
        return [_row(r) for r in rows], int(total)

    def update_meta(self, job_id: uuid.UUID, *, tags: Sequence[str] | None = None, add_tags: Sequence[str] = (),
                    remove_tags: Sequence[str] = (), note: str | None = None, set_note: bool = False
                    ) -> dict[str, Any]:
        """Change a job's tags and note (any status): ``tags`` replaces them, then ``add_tags`` are added (in
        order, once) and ``remove_tags`` removed; ``set_note`` writes ``note`` (None clears it).
        :class:`TooManyTags` when the result would hold more than :data:`MAX_JOB_TAGS`."""
        with self.engine.begin() as c:
            row = c.execute(text("SELECT tags FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id}).first()
            if row is None:
                raise JobNotFound(str(job_id))
            current = list(row.tags) if tags is None else list(tags)
            current = [t for t in dict.fromkeys([*current, *add_tags]) if t not in set(remove_tags)]
            if len(current) > MAX_JOB_TAGS:
                raise TooManyTags(f"at most {MAX_JOB_TAGS} tags; the job would have {len(current)}")
            sets, params = ["tags = CAST(:tags AS text[])"], {"id": job_id, "tags": current}
            if set_note:
                sets.append("note = :note")
                params["note"] = note
            c.execute(text(f"UPDATE jobs SET {', '.join(sets)} WHERE id = :id"), params)
            return _row(c.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"), {"id": job_id}).one())

    def events(self, job_id: uuid.UUID) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT id, at, event, from_status, to_status, attempt, worker, detail "
                                  "FROM job_events WHERE job_id = :id ORDER BY id"), {"id": job_id})
            return [_row(r) for r in rows]

    # ------------------------------------------------------------------ cancellation
    def cancel(self, job_id: uuid.UUID, reason: str = "cancelled by request") -> dict[str, Any]:
        """Queued -> ``cancelled`` at once; running -> ``cancelling`` (its worker stops it within seconds).

        Cancelling a job that is already cancelling or cancelled changes nothing; a succeeded or failed
        job raises :class:`InvalidTransition`.
        """
        row = self._one(SQL_CANCEL, {"id": job_id, "reason": reason})
        if row is not None:
            if row.status == "cancelled":
                self.fail_blocked_dependents()
            return _row(row)
        job = self.get(job_id)
        if job["status"] in ("cancelling", "cancelled"):
            return job
        raise InvalidTransition(f"job {job_id} has already {job['status']}; it cannot be cancelled")

    # ------------------------------------------------------------------ worker side
    def claim(self, owner: str, kinds: Sequence[str] = CLAIMABLE_KINDS) -> Lease | None:
        """Take the next runnable job (queued, due, every dependency succeeded), or None."""
        skip: list[str] = []  # owners found at their quota under the lock in this claim
        with self.engine.begin() as c:
            for _ in range(MAX_CLAIM_ROUNDS):
                cand = c.execute(text(SQL_CLAIM_CANDIDATE), {"kinds": list(kinds), "skip": skip}).first()
                if cand is None:
                    return None
                c.execute(text(SQL_QUOTA_LOCK), {"owner": cand.owner})
                if c.execute(text(SQL_QUOTA_BLOCK), {"owner": cand.owner, "gpus": cand.gpus}).scalar() is not None:
                    skip.append(cand.owner or "")  # another claimer started one of its jobs meanwhile
                    continue
                row = c.execute(text(SQL_CLAIM_TAKE), {"id": cand.id, "owner": owner,
                                                       "lease": self.lease_seconds}).one()
                break
            else:
                return None
        left = None if row.deadline_left is None else float(row.deadline_left)
        return Lease(row.id, owner, row.attempts, row.kind, row.spec, row.max_attempts, tuple(row.depends_on), left)

    def heartbeat(self, lease: Lease) -> Heartbeat:
        """Extend the lease; says whether a cancel was requested, or that the lease was lost."""
        row = self._one(SQL_HEARTBEAT, self._fence(lease) | {"lease": self.lease_seconds})
        if row is None:
            return Heartbeat(False, False)
        return Heartbeat(True, bool(row.cancel_requested), bool(row.preempt_requested))

    def preempted(self, lease: Lease, reason: str) -> str | None:
        """The run stopped at an epoch checkpoint for a job of higher priority: back to ``queued`` at once,
        the attempt not counted (``cancelled`` if a cancel was requested meanwhile). Recorded in ``job_events``
        as ``preempted``. Returns the new status (None: the lease was lost)."""
        row = self._one(SQL_PREEMPTED, self._fence(lease) | {"reason": reason})
        return None if row is None else str(row.status)

    def request_preemption(self, after_seconds: float, kinds: Sequence[str] = CLAIMABLE_KINDS
                           ) -> tuple[uuid.UUID, uuid.UUID] | None:
        """If a claimable job has waited ``after_seconds`` while a train job of lower priority runs, ask that
        run to stop at its next epoch checkpoint (``preempt_requested``; recorded in ``job_events``).
        Returns ``(preempted job, waiting job)``, or None."""
        row = self._one(SQL_REQUEST_PREEMPTION, {"after": float(after_seconds), "kinds": list(kinds)})
        return None if row is None else (row.id, row.waiting_id)

    def set_progress(self, lease: Lease, progress: float, *, stage: str | None = None, epoch: int | None = None,
                     total_epochs: int | None = None) -> bool:
        p = min(max(float(progress), 0.0), 1.0)
        params = self._fence(lease) | {"p": p, "stage": stage, "epoch": epoch, "total": total_epochs}
        return self._count(SQL_PROGRESS, params) == 1

    def succeed(self, lease: Lease, result: Mapping[str, Any]) -> bool:
        ok = self._count(SQL_SUCCEED, self._fence(lease) | {"result": to_json(result)}) == 1
        return ok

    def fail(self, lease: Lease, error: str) -> bool:
        """A permanent failure (user error): ``failed``, never retried."""
        ok = self._count(SQL_FAIL, self._fence(lease) | {"error": error}) == 1
        if ok:
            self.fail_blocked_dependents()
        return ok

    def mark_cancelled(self, lease: Lease, detail: str = "cancelled by request") -> bool:
        ok = self._count(SQL_CANCELLED, self._fence(lease) | {"error": detail}) == 1
        if ok:
            self.fail_blocked_dependents()
        return ok

    def retry_later(self, lease: Lease, error: str) -> str | None:
        """A transient failure: back to ``queued`` after a backoff, or ``failed`` when attempts are used up
        (``cancelled`` if a cancel was requested meanwhile). Returns the new status (None: lease lost)."""
        row = self._one(SQL_RETRY, self._fence(lease) | {"error": error} | self.backoff)
        if row is not None and row.status != "queued":
            self.fail_blocked_dependents()
        return None if row is None else str(row.status)

    def retry_infra(self, lease: Lease, error: str) -> str | None:
        """An infrastructure failure (Ray or the machine, not the job): back to ``queued`` after a backoff
        that doubles per infrastructure failure, **without** spending one of the job's ``max_attempts``;
        ``failed`` once the job has had ``max_infra_failures`` of them (so a permanently broken cluster cannot
        retry a job forever). Returns the new status (None: lease lost)."""
        row = self._one(SQL_INFRA_RETRY, self._fence(lease) | {"error": error, "max_infra": self.max_infra_failures}
                        | self.backoff)
        if row is not None and row.status != "queued":
            self.fail_blocked_dependents()
        return None if row is None else str(row.status)

    def release(self, lease: Lease, reason: str) -> bool:
        """Hand a job back without blame (its worker is shutting down): queued at once, attempt not counted."""
        return self._one(SQL_RELEASE, self._fence(lease) | {"reason": reason}) is not None

    def sweep_expired(self) -> list[tuple[uuid.UUID, str]]:
        """Return jobs whose lease expired (worker died or hung) to the queue: an infrastructure failure,
        with its backoff, not charged to the job's ``max_attempts`` (see :meth:`retry_infra`).

        A job that has had ``max_infra_failures`` of them fails; one with a pending cancel ends ``cancelled``.
        """
        with self.engine.begin() as c:
            rows = c.execute(text(SQL_SWEEP), self.backoff | {"max_infra": self.max_infra_failures}).all()
        if any(r.status != "queued" for r in rows):
            self.fail_blocked_dependents()
        return [(r.id, str(r.status)) for r in rows]

    def fail_blocked_dependents(self) -> int:
        """Queued jobs whose dependency failed or was cancelled can never run: fail them, saying why."""
        total = 0
        for _ in range(100):  # a chain of dependents fails one level per statement
            n = self._count(SQL_FAIL_BLOCKED, {})
            total += n
            if n == 0:
                break
        return total

    @staticmethod
    def _fence(lease: Lease) -> dict[str, Any]:
        return {"id": lease.job_id, "owner": lease.owner, "attempt": lease.attempt}

    # ------------------------------------------------------------------ metrics and logs
    def record_metrics(self, job_id: uuid.UUID, step: int, metrics: Mapping[str, Any], attempt: int = 0, *,
                       overwrite: bool = True) -> int:
        """Store the finite numbers of ``metrics`` as points ``(name, step, value)``; a re-run step overwrites
        (with ``overwrite=False`` a point already stored is kept)."""
        rows = [{"job": job_id, "name": str(k), "step": int(step), "value": float(v), "attempt": attempt}
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and abs(v) != float("inf") and v == v]
        if rows:
            with self.engine.begin() as c:
                c.execute(text(SQL_METRICS if overwrite else SQL_METRICS_KEEP), rows)
        return len(rows)

    def metric_steps(self, job_id: uuid.UUID) -> set[int]:
        """The steps at which the job has at least one stored metric point."""
        with self.engine.connect() as c:
            return {int(r[0]) for r in c.execute(text("SELECT DISTINCT step FROM job_metrics WHERE job_id = :id"),
                                                 {"id": job_id})}

    def metrics(self, job_id: uuid.UUID, name: str | None = None) -> list[dict[str, Any]]:
        cond, params = "job_id = :id", {"id": job_id}
        if name:
            cond += " AND name = :name"
            params["name"] = name
        with self.engine.connect() as c:
            rows = c.execute(text(f"SELECT name, step, value, attempt, at FROM job_metrics WHERE {cond} "
                                  "ORDER BY name, step"), params)
            return [_row(r) for r in rows]

    def append_logs(self, job_id: uuid.UUID, lines: Sequence[str], attempt: int = 0) -> None:
        rows = [{"job": job_id, "line": str(x), "attempt": attempt} for x in lines]
        if rows:
            with self.engine.begin() as c:
                c.execute(text("INSERT INTO job_logs (job_id, line, attempt) VALUES (:job, :line, :attempt)"),
                          rows)

    def logs(self, job_id: uuid.UUID, *, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT id, at, attempt, line FROM job_logs WHERE job_id = :id AND id > :after "
                                  "ORDER BY id LIMIT :limit"), {"id": job_id, "after": after, "limit": limit})
            return [_row(r) for r in rows]

    # ------------------------------------------------------------------ trials (child rows of a tune job)
    def upsert_trials(self, parent_id: uuid.UUID, trials: Sequence[Mapping[str, Any]]) -> int:
        """Mirror a tune job's trials as child jobs of kind ``trial``, keyed by the trial id.

        Each trial is a dict with ``trial_id``, ``status`` (Ray's: PENDING, RUNNING, TERMINATED, ERROR...),
        ``config``, and anything else (latest metrics, ``error``), which is stored as the trial's result.
        """
        rows = []
        for t in trials:
            trial_id = str(t.get("trial_id") or t.get("id") or "")
            if not trial_id:
                continue
            status = trial_status(str(t.get("status", "")))
            progress = 1.0 if status in TERMINAL_STATUSES else min(max(float(t.get("progress") or 0.0), 0.0), 1.0)
            rows.append({"id": uuid.uuid4(), "status": status,
                         "spec": to_json({"trial_id": trial_id, "config": t.get("config", {})}),
                         "result": to_json({k: v for k, v in t.items() if k not in ("config", "status")}),
                         "error": t.get("error"), "key": f"{RESERVED_KEY_PREFIX}{parent_id}:{trial_id}",
                         "parent": parent_id, "progress": progress})
        if rows:
            with self.engine.begin() as c:
                for r in rows:
                    c.execute(text(SQL_TRIAL), r)
        return len(rows)


__all__ = ["MAX_JOB_TAGS", "RESERVED_KEY_PREFIX", "Heartbeat", "IdempotencyConflict", "InvalidTransition",
           "JobNotFound", "Lease", "Queue", "TooManyTags", "like_escape", "request_hash", "to_json", "trial_status"]
