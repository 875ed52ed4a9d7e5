"""The ``robust-ensembles`` command line: the composition root of every command (the console script).

``service/`` never imports ``workers/`` (``tests/unit/test_layering.py`` checks the import graph), and
``workers/`` sits above ``service/``, so the entry point lives here: it takes :mod:`service.cli`'s
commands and parser and plugs in what only ``workers/`` has (:class:`service.cli.EntryPoint`):

- the ``worker`` command (lease jobs from the queue and run them with Ray), defined below;
- the program ``up`` starts its worker with (``python -m workers.main worker``) and ``demo`` its
  service with (``python -m workers.main up``);
- the environment ``up`` gives that worker so its local Ray listens on loopback only
  (:func:`workers.ray_local.loopback_env`).

``python -m workers.main ARGS`` is the same as ``robust-ensembles ARGS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from service import cli
from service.cli_common import Database, command_settings, setup_logging
from service.settings import Settings
from workers.ray_local import loopback_env

log = logging.getLogger("robust_ensembles")

PROGRAM = (sys.executable, "-m", "workers.main")


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's temp dir under the data dir, unless that path is too long for Ray's unix sockets."""
    d = settings.data_dir / "ray"
    if len(str(d)) > 48:  # session dirs and socket names add ~60 characters; AF_UNIX paths stop at 107
        import tempfile

        return Path(tempfile.mkdtemp(prefix="re-ray-"))
    return d


def _install_stop_signals(stop: Callable[[], None]) -> None:
    count = {"n": 0}

    def handler(signum: int, frame: FrameType | None) -> None:
        count["n"] += 1
        if count["n"] > 1:
            raise KeyboardInterrupt
        log.info("signal %d: stopping (a running job is handed back to the queue)", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _watch_parent(parent_pid: int, stop: Callable[[], None]) -> None:
    """Stop when the parent (``robust-ensembles up``) is gone, so a killed ``up`` leaves no orphan worker."""

    def loop() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent_pid:
                log.warning("parent process %d is gone: stopping", parent_pid)
                stop()
                return

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def cmd_worker(args: argparse.Namespace) -> int:
    """``robust-ensembles worker``: lease jobs and run them with Ray (its options: :func:`service.cli.build_parser`)."""
    from service import migrate
    from workers.warm import idle_seconds, warm_enabled
    from workers.warm_ddp import warm_ddp_enabled
    from workers.worker import Worker, connect_ray

    setup_logging(args.verbose)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:  # the warm path's settings (workers/warm.py), read again per job: a typo stops the worker here
        warm_enabled()
        warm_ddp_enabled()
        idle_seconds()
    except ValueError as e:
        log.error("%s", e)
        return 2
    settings = command_settings(args)
    with Database(settings) as url:
        current, head = migrate.current_revision(url), migrate.head_revision()
        if current != head:
            log.error("database schema at %s, expected %s: run `robust-ensembles db upgrade` first", current, head)
            return 2
        connect_ray(args.address, temp_dir=None if args.address else ray_temp_dir(settings), num_cpus=args.num_cpus)
        worker = Worker(settings.with_(database_url=url))
        _install_stop_signals(worker.stop)
        if args.parent_pid:
            _watch_parent(args.parent_pid, worker.stop)
        try:
            worker.run(max_jobs=args.max_jobs)
        finally:
            import ray

            ray.shutdown()
    return 0


ENTRY = cli.EntryPoint(program=PROGRAM, worker=cmd_worker, worker_env=loopback_env())


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, ``worker`` included."""
    return cli.build_parser(ENTRY)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``robust-ensembles`` console script."""
    return cli.main(argv, ENTRY)


if __name__ == "__main__":
    sys.exit(main())
