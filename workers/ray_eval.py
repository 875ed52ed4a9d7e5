"""Run one evaluate job: in-process for small subsets, sharded across Ray tasks for large ones.

The worker loop calls :func:`run_evaluate_job`. The computation itself is the Ray-free library
(:mod:`ensemble_core.evaluation`): an evaluation is a list of example batches; a shard is a contiguous
range of batches, computed by :func:`ensemble_core.evaluation.compute` with its own resumable state
file. Seeds depend on the batch, never on the shard, so one process and N shards give the same
per-example results; the per-example states are concatenated and summarised once (records, flags,
tables, plots).

- Resume: shard states live in ``<artifacts_dir>/eval_state/`` and are saved every few seconds; a
  re-leased job (or a Ray task retried after its worker died) skips every finished (unit, batch) piece.
- Cancel: ``should_stop`` is polled on the caller's thread; the request reaches the shards through a
  :class:`~workers.ray_common.JobChannel`, they save their state and stop between batches. Shards that do
  not stop within a grace period are cancelled by force.
- Failures: an invalid spec, a missing or incompatible checkpoint, or missing data raise
  :class:`~workers.errors.UserError` before any work starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ensemble_core.spec import EvaluateSpec
from workers.errors import InfrastructureError, JobCancelled, UserError

IN_PROCESS_MAX_BATCHES = 2  # evaluations of at most this many batches never start Ray tasks
STOP_GRACE_S = 30.0
PROGRESS_EVERY_S = 2.0


def validate_evaluate_spec(spec: dict[str, Any] | EvaluateSpec) -> EvaluateSpec:
    from workers.ray_common import describe_validation_error

    try:
        return spec if isinstance(spec, EvaluateSpec) else EvaluateSpec.model_validate(spec)
    except ValidationError as e:
        raise UserError(f"invalid evaluate spec: {describe_validation_error(e)}") from e
    except ValueError as e:
        raise UserError(f"invalid evaluate spec: {e}") from e


def _plan(spec: EvaluateSpec, checkpoints: dict[str, str | None]) -> Any:
    from ensemble_core.data import DataUnavailableError
    from ensemble_core.evaluation import prepare_plan

    target = checkpoints.get("target")
    if not target:
        raise UserError("target_job / target_model / target_checkpoint: no checkpoint for the target")
    surrogate = checkpoints.get("surrogate")
    if spec.transfer_attacks and not surrogate:
        raise UserError("transfer_attacks: transfer attacks need transfer_from_job, transfer_from_model or "
                        "transfer_from_checkpoint")
    try:
        return prepare_plan(spec, target, baseline=checkpoints.get("baseline"),
                            surrogates={"surrogate": surrogate} if surrogate else {})
    except (FileNotFoundError, DataUnavailableError) as e:
        raise UserError(str(e)) from e
    except ValueError as e:
        raise UserError(f"cannot evaluate: {e}") from e


def shard_ranges(n_batches: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal batch ranges."""
    shards = max(1, min(shards, n_batches))
    base, extra = divmod(n_batches, shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _eval_shard(spec_dict: dict[str, Any], checkpoints: dict[str, str | None], batch_range: tuple[int, int],
                state_path: str, cache_dir: str, threads: int, shard: int, channel: Any) -> dict[str, Any]:
    """Body of one Ray task: build the same plan, compute this shard's batches, return its state."""
    import ray
    import torch

    from ensemble_core.evaluation import EvaluationStopped, compute, prepare_plan

    torch.set_num_threads(threads)
    spec = EvaluateSpec.model_validate(spec_dict)
    surrogate = checkpoints.get("surrogate")
    plan = prepare_plan(spec, checkpoints["target"], baseline=checkpoints.get("baseline"),
                        surrogates={"surrogate": surrogate} if surrogate else {})
    last = [0.0, 0.0]

    def progress(frac: float, msg: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or frac >= 1.0:
            last[0] = now
            channel.push.remote("progress", (shard, frac, msg))

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[1] < 1.0:
            return False
        last[1] = now
        return ray.get(channel.stop_reason.remote()) is not None

    def log(msg: str) -> None:
        channel.push.remote("log", f"shard {shard}: {msg}")

    try:
        state = compute(plan, batch_range=batch_range, state_path=state_path, cache_dir=cache_dir, progress=progress,
                        should_stop=should_stop, log=log)
    except EvaluationStopped:
        return {"stopped": True}
    return {"stopped": False, "state": state.to_dict()}


def run_evaluate_job(spec: dict[str, Any], *, job_id: str, artifacts_dir: str, checkpoints: dict[str, str | None],
                     on_progress: Callable[[float, str], None], should_stop: Callable[[], bool],
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate per ``spec``; writes ``results.json``, ``report.md``, the PNG plots and ``per_example.json``
    into ``artifacts_dir`` and returns the results (see :func:`ensemble_core.evaluation.records.summarize`)."""
    from ensemble_core.evaluation import EvaluationStopped, compute
    from ensemble_core.evaluation.records import summarize, write_artifacts

    t0 = time.perf_counter()
    es = validate_evaluate_spec(spec)
    out = Path(artifacts_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "eval_state"
    cache_dir = state_dir / "transfer-cache"
    plan = _plan(es, checkpoints)
    batches = plan.batches()
    shards = shard_ranges(len(batches), es.workers if len(batches) > IN_PROCESS_MAX_BATCHES else 1)
    log(f"evaluate job {job_id}: {plan.n} examples in {len(batches)} batches, {len(shards)} shard(s); models "
        f"{', '.join(m.name for m in plan.models)}; surrogates {', '.join(s.name for s in plan.surrogates) or 'none'}")
    if len(shards) == 1:
        try:
            state = compute(plan, state_path=state_dir / "state.json", cache_dir=cache_dir, progress=on_progress,
                            should_stop=should_stop, log=log)
        except EvaluationStopped as e:
            raise JobCancelled("evaluation stopped on request (state saved; it resumes when re-run)") from e
    else:
        state = _run_sharded(es, checkpoints, shards, state_dir, cache_dir, on_progress, should_stop, log)
    result = summarize(plan, state, wall_time_s=time.perf_counter() - t0)
    result["job_id"] = job_id
    result["shards"] = len(shards)
    (out / "per_example.json").write_text(json.dumps({"test_indices": plan.indices, **state.to_dict()}))
    write_artifacts(result, out, extra=["per_example.json"])
    on_progress(1.0, "done")
    return result


def _run_sharded(spec: EvaluateSpec, checkpoints: dict[str, str | None], shards: list[tuple[int, int]],
                 state_dir: Path, cache_dir: Path, on_progress: Callable[[float, str], None],
                 should_stop: Callable[[], bool], log: Callable[[str], None]) -> Any:
    import ray

    from ensemble_core.evaluation import EvalState
    from workers.ray_common import JobChannel, cpus_per_worker, ensure_ray, torch_threads_for

    ensure_ray()
    from workers.warm import make_room

    cpus = cpus_per_worker()
    make_room(cpus, 1.0 if spec.use_gpu else 0.0)  # a shard's: idle warm actors and groups hold cores
    options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 2}
    if spec.use_gpu:
        options["num_gpus"] = 1
    task = ray.remote(_eval_shard).options(**options)
    channel = JobChannel.remote()
    spec_dict = spec.model_dump(mode="json")
    refs = [task.remote(spec_dict, checkpoints, rng, str(state_dir / f"shard-{i}-of-{len(shards)}.json"),
                        str(cache_dir), torch_threads_for(cpus), i, channel) for i, rng in enumerate(shards)]
    fractions = [0.0] * len(shards)
    weights = [(b - a) for a, b in shards]
    pending = list(refs)
    stop_at: float | None = None
    last_poll = 0.0
    try:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for kind, payload in ray.get(channel.drain.remote()):
                if kind == "progress":
                    i, frac, msg = payload
                    fractions[i] = frac
                    total = sum(f * w for f, w in zip(fractions, weights, strict=True)) / sum(weights)
                    on_progress(min(total, 0.999), f"shard {i}: {msg}")
                elif kind == "log":
                    log(str(payload))
            now = time.monotonic()
            if stop_at is None and now - last_poll >= 1.0:
                last_poll = now
                if should_stop():
                    log("stop requested: asking the shards to save their state and stop")
                    ray.get(channel.request_stop.remote("cancel"))
                    stop_at = now
            if stop_at is not None and now - stop_at > STOP_GRACE_S:
                for r in pending:
                    ray.cancel(r, force=True)
                raise JobCancelled("evaluation stopped on request (shards cancelled after the grace period)")
        outs = ray.get(refs)
    except ray.exceptions.RayError as e:
        if stop_at is not None:
            raise JobCancelled("evaluation stopped on request") from e
        raise InfrastructureError(f"an evaluation shard failed: {e}") from e
    finally:
        ray.kill(channel)
    if stop_at is not None or any(o["stopped"] for o in outs):
        raise JobCancelled("evaluation stopped on request (state saved; it resumes when re-run)")
    return EvalState.merge([EvalState.from_dict(o["state"]) for o in outs])


__all__ = ["run_evaluate_job", "shard_ranges", "validate_evaluate_spec"]
