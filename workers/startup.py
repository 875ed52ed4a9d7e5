"""Where a train job's start-up goes: wall-clock stamps of its phases, turned into seconds per phase.

A run's stamps are ``time.time()`` readings from the job worker's process and from the training process (on
one machine they share a clock; across machines they differ by the hosts' clock offset), in this order:

- ``call``: the job worker enters the run (``run_train_job``);
- ``fit``: it hands the run to Ray: ``TorchTrainer.fit()`` (cold path) or the warm actor's ``run()``;
- ``process``: rank 0's training process was started by the operating system (cold path, where that
  process is new for this run: Ray Train's workers are started per run);
- ``pg_start``, ``pg_end``: Ray Train's torch backend starts / has finished ``init_process_group`` on every
  rank (cold path only; absent where Ray's torch backend could not be timed);
- ``loop``: the training function starts in the training process (rank 0);
- ``imports``: it has imported the training code;
- ``setup``: it has registered with the run's channel, asked whether to stop (a collective across the
  ranks) and loaded the checkpoint to resume from, if any: it calls the training loop;
- ``data``: the data sets are decoded and split (:func:`ensemble_core.training.setup_run`);
- ``model``: the members and auxiliary modules are built;
- ``first_step``: the first optimizer step of the run is done.

:func:`breakdown` names the gaps between consecutive stamps that are present (:data:`PHASES`; a gap over a
missing stamp is named by the first and last phase it spans, e.g. ``ray_scheduling..train_session`` on the warm
path, whose actor process outlives the runs and has no process group); their sum is the time from ``call``
to the first step. ``bench service`` prints it per job and ``results.json`` keeps it (``startup_s``), so a
user sees where a small job's seconds went (issue "Warm start", docs/benchmarks.md, "Start-up breakdown").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAMPS = ("call", "fit", "process", "pg_start", "pg_end", "loop", "imports", "setup", "data", "model", "first_step")
# the phase that ends at each stamp (from the stamp present before it)
PHASES = {
    "fit": "prepare",  # spec validation, Ray connection, the run's channel and trainer objects
    "process": "ray_scheduling",  # Train controller actor, placement group, the worker process spawned
    "pg_start": "worker_start",  # python, ray, torch and Ray Train's worker set-up in the new process
    "pg_end": "process_group",  # torch.distributed.init_process_group on every rank
    "loop": "train_session",  # Ray Train hands the training function to its workers
    "imports": "imports",  # the training code, in the training process
    "setup": "run_setup",  # channel registration, the first stop check, the resume checkpoint
    "data": "data",  # reading (ensemble_core/datacache.py) and splitting the data sets
    "model": "model_build",  # members, auxiliary modules, the method object
    "first_step": "first_batch",  # optimizer, DDP wrapper, the first batch's forward, backward and step
}
PG_ENV = "RE_PROCESS_GROUP_STAMPS"  # "start,end" in each Ray Train worker's environment


def breakdown(stamps: dict[str, float]) -> dict[str, float]:
    """Seconds per phase between consecutive present stamps, in :data:`STAMPS` order, plus ``total``.

    Raises ``ValueError`` on an unknown stamp or on stamps that go back in time by more than 50 ms (the
    tolerance covers two processes' reads of one clock)."""
    unknown = set(stamps) - set(STAMPS)
    if unknown:
        raise ValueError(f"unknown start-up stamps: {sorted(unknown)}")
    present = [s for s in STAMPS if s in stamps]
    out: dict[str, float] = {}
    for before, after in zip(present, present[1:], strict=False):
        gap = float(stamps[after]) - float(stamps[before])
        if gap < -0.05:
            raise ValueError(f"start-up stamp {after!r} is {-gap:.3f} s before {before!r}")
        spanned = STAMPS[STAMPS.index(before) + 1:STAMPS.index(after) + 1]
        name = PHASES[after] if len(spanned) == 1 else f"{PHASES[spanned[0]]}..{PHASES[after]}"
        out[name] = max(gap, 0.0)
    if len(present) >= 2:
        out["total"] = max(float(stamps[present[-1]]) - float(stamps[present[0]]), 0.0)
    return out


def describe(parts: dict[str, float]) -> str:
    """One log line: ``start-up 9.81 s to the first step: prepare 0.12, ray_scheduling 6.02, ...``."""
    body = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if k != "total")
    return f"start-up {parts.get('total', 0.0):.2f} s to the first step: {body}"


def note_process_group(start: float, end: float) -> None:
    """Run on each Ray Train worker after the process group is up: leave its stamps for the training loop."""
    os.environ[PG_ENV] = f"{start!r},{end!r}"


def process_group_stamps() -> dict[str, float]:
    """The process-group stamps left by :func:`note_process_group` in this process, if any."""
    raw = os.environ.get(PG_ENV, "")
    try:
        start, end = (float(x) for x in raw.split(","))
    except ValueError:
        return {}
    return {"pg_start": start, "pg_end": end}


def process_started_at() -> float | None:
    """This process's start, on the ``time.time()`` clock (Linux ``/proc``, about 10 ms precision); None
    elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / hz)
