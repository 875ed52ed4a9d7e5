"""``robust-ensembles up``: everything for one machine in one command.

Embedded PostgreSQL (unless ``DATABASE_URL`` is set) -> migrations -> one worker process (which
starts a local Ray with its files under the data directory) -> the API on ``127.0.0.1:PORT``. The
worker's command line and environment come from the entry point (:class:`service.cli.EntryPoint`:
``robust-ensembles worker``), so this module imports nothing from ``workers/``.
Ctrl-C or SIGTERM stops it all cleanly: the API drains, the worker hands a running job back to the
queue (it resumes from its last checkpoint on the next start), and the database is shut down.

The worker runs in its own session (process group), so a Ctrl-C in the terminal reaches only this
process, which then stops the worker in order rather than having every process die at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from service.settings import Settings

log = logging.getLogger("robust_ensembles.up")

WORKER_STOP_TIMEOUT_S = 90.0  # a running Ray Train job needs up to ~20 s to stop, Ray a few more to shut down
WORKER_MAX_RESTARTS = 5


class _Terminate(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate()


class WorkerProcess:
    """The worker subprocess, restarted (a few times, with backoff) if it dies while ``up`` runs.

    ``command`` starts the worker (``robust-ensembles worker``: :attr:`service.cli.EntryPoint.program` +
    ``worker``); ``local_ray_env`` is added to its environment when it starts a local Ray (no ``ray_address``).
    """

    def __init__(self, settings: Settings, database_url: str, *, command: Sequence[str],
                 local_ray_env: Mapping[str, str] | None = None, ray_address: str | None, num_cpus: int | None,
                 log_path: Path) -> None:
        self.cmd = [*command, "--data-dir", str(settings.data_dir), "--database-url", database_url,
                    "--parent-pid", str(os.getpid())]
        if ray_address:
            self.cmd += ["--address", ray_address]
        if num_cpus:
            self.cmd += ["--num-cpus", str(num_cpus)]
        self.env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    "PYTHONUNBUFFERED": "1"}
        if not ray_address:  # e.g. the worker's local Ray listens on 127.0.0.1 only (set before Ray is imported)
            self.env.update(local_ray_env or {})
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the life of the process
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("worker started (pid %d), log: %s", self.proc.pid, self.log_path)

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            if self._stopping.is_set():
                return
            if self.restarts >= WORKER_MAX_RESTARTS:
                log.error("worker exited with code %s; not restarting it again (see %s)", proc.returncode,
                          self.log_path)
                return
            self.restarts += 1
            delay = min(2.0**self.restarts, 30.0)
            log.warning("worker exited with code %s; restarting in %.0f s (see %s)", proc.returncode, delay,
                        self.log_path)
            if self._stopping.wait(delay):
                return
            self._spawn()

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            log.info("stopping the worker (a running job is handed back to the queue)")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not stop within %.0f s: killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _allowed_hosts(settings: Settings, host: str) -> tuple[str, ...] | None:
    """The Host names the API answers to with auth off: the configured ones plus the address it listens on
    (unless a wildcard: then only the configured names, ``RE_ALLOWED_HOSTS`` adding the machine's)."""
    names = settings.allowed_hosts
    if names is None or host in ("0.0.0.0", "::", ""):
        return names
    return (*names, host) if host not in names else names


def run_up(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, worker: bool = True,
           ray_address: str | None = None, num_cpus: int | None = None, worker_command: Sequence[str] = (),
           worker_env: Mapping[str, str] | None = None) -> int:
    """Run the whole stack until Ctrl-C / SIGTERM. Returns the exit code.

    ``worker_command`` / ``worker_env``: how to start the worker (see :class:`WorkerProcess`); needed
    unless ``worker`` is False.
    """
    if worker and not worker_command:
        raise ValueError("run_up: a worker needs worker_command (robust-ensembles worker)")
    import uvicorn

    from service import migrate
    from service.app import create_app
    from service.pg import EmbeddedPostgres

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs_dir = settings.data_dir / "logs"
    previous = signal.signal(signal.SIGTERM, _raise_terminate)
    pg: EmbeddedPostgres | None = None
    proc: WorkerProcess | None = None
    code = 0
    try:
        url = settings.database_url
        if not url:
            t0 = time.monotonic()
            pg = EmbeddedPostgres(settings.data_dir)
            url = pg.url
            log.info("embedded PostgreSQL ready in %.1f s (%s)", time.monotonic() - t0, pg.pgdata)
        migrate.upgrade(url)
        log.info("database schema at revision %s", migrate.current_revision(url))
        if worker:
            proc = WorkerProcess(settings, url, command=worker_command, local_ray_env=worker_env,
                                 ray_address=ray_address, num_cpus=num_cpus, log_path=logs_dir / "worker.log")
            proc.start()
        app = create_app(settings.with_(database_url=url, allowed_hosts=_allowed_hosts(settings, host)))
        log.info("API on http://%s:%d (docs: http://%s:%d/docs); data in %s", host, port, host, port,
                 settings.data_dir)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                               timeout_graceful_shutdown=5))
        server.run()  # returns after a graceful shutdown on SIGINT / SIGTERM
        if not server.started:
            code = 1
    except KeyboardInterrupt:
        pass
    except SystemExit as e:  # uvicorn exits this way when it cannot bind the port
        code = int(e.code) if isinstance(e.code, int) else 1
    finally:
        log.info("shutting down")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        try:
            if proc is not None:
                proc.stop()
            if pg is not None:
                pg.stop()
                log.info("embedded PostgreSQL stopped")
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    return code
