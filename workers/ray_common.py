"""Pieces shared by the Ray Train and Ray Tune runners.

- :func:`ensure_ray` connects to (or starts) Ray once per process.
- :class:`JobChannel` is a tiny Ray actor per run: Train workers push epoch metrics and log lines
  into it and poll it for a stop request; the caller's process drains it. Only rank 0 talks to it
  in the hot loop, and only every few steps.
- :func:`drive` runs a blocking ``fit()`` in a background thread while the *calling* thread drains
  events, calls the caller's callbacks (``on_epoch``, ``log``, ...) and polls ``should_stop``, so the
  caller's callbacks (database writes) all happen on the caller's own thread.
- :func:`describe_validation_error` turns a pydantic error into one readable line naming each field.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from workers.ray_local import keep_local_ray_on_loopback

T = TypeVar("T")

# CPU cores reserved by (and torch threads used in) each Ray Train worker or Tune trial process.
# One per worker is right on small machines; a node with many cores per job can raise it.
DEFAULT_CPUS_PER_WORKER = 1.0


def cpus_per_worker() -> float:
    raw = os.environ.get("RE_CPUS_PER_WORKER", "")
    try:
        value = float(raw) if raw else DEFAULT_CPUS_PER_WORKER
    except ValueError as e:
        raise ValueError(f"RE_CPUS_PER_WORKER must be a number, got {raw!r}") from e
    if value <= 0:
        raise ValueError(f"RE_CPUS_PER_WORKER must be positive, got {raw!r}")
    return value


def torch_threads_for(cpus: float) -> int:
    """Torch intra-op threads for a process that reserved ``cpus`` cores (never fewer than one)."""
    return max(1, int(cpus))


def ensure_ray() -> None:
    """Connect to the Ray cluster named by ``RAY_ADDRESS`` (or start a local one) if not yet connected."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            keep_local_ray_on_loopback()
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def describe_validation_error(err: Exception, prefix: str = "") -> str:
    """``field.path: message; ...`` for a pydantic ``ValidationError``; ``str(err)`` otherwise."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    parts = []
    for e in errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        parts.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", "")))
    return "; ".join(parts) or str(err)


@ray.remote(num_cpus=0)
class JobChannel:
    """Events from the workers of one run to its caller, and the caller's stop request to the workers."""

    def __init__(self) -> None:
        self._events: list[tuple[str, Any]] = []
        self._stop: str | None = None
        self._workers: dict[int, Any] = {}

    def push(self, kind: str, payload: Any) -> None:
        self._events.append((kind, payload))

    def drain(self) -> list[tuple[str, Any]]:
        events, self._events = self._events, []
        return events

    def request_stop(self, reason: str) -> None:
        if self._stop is None:
            self._stop = reason

    def stop_reason(self) -> str | None:
        return self._stop

    def register_worker(self, rank: int, handle: Any) -> None:
        self._workers[rank] = handle

    def workers(self) -> list[Any]:
        return list(self._workers.values())


@dataclass
class DriveState:
    """What the caller's loop learned while ``fit()`` ran."""

    stop_reason: str | None = None  # "cancel" or "user_error"
    user_error: str | None = None
    stop_requested_at: float | None = None
    forced: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def drive(
    fit: Callable[[], T],
    *,
    drain: Callable[[], list[tuple[str, Any]]],
    handle: Callable[[str, Any, DriveState], None],
    should_stop: Callable[[], bool],
    request_stop: Callable[[str], None],
    force_stop: Callable[[], None] | None = None,
    flush: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 0.25,
    stop_poll_s: float = 1.0,
    grace_s: float = 20.0,
    give_up_s: float = 120.0,
) -> tuple[T | None, BaseException | None, DriveState]:
    """Run ``fit`` in a thread; on this thread deliver events and watch for a stop request.

    ``handle(kind, payload, state)`` is called for each drained event (it may set
    ``state.stop_reason``/``state.user_error``; the stop is then forwarded with ``request_stop``).
    When a stop was requested and ``fit`` has not returned ``grace_s`` seconds later, ``force_stop``
    is called once (e.g. kill the workers); after ``give_up_s`` more seconds the call returns
    without waiting for the thread. ``flush()`` is called after each batch of events was handled.
    Returns ``(value, exception, state)``.
    """
    state = DriveState()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=target, name="ray-fit", daemon=True)
    thread.start()
    last_stop_poll = 0.0

    def deliver() -> int:
        try:
            events = drain()
        except Exception as e:  # noqa: BLE001 - the channel may be gone at the very end
            log(f"could not read run events: {e}")
            return 0
        for kind, payload in events:
            handle(kind, payload, state)
        if events and flush is not None:
            flush()
        return len(events)

    def ask_stop(reason: str) -> None:
        if state.stop_requested_at is not None:
            return
        state.stop_reason = state.stop_reason or reason
        state.stop_requested_at = time.monotonic()
        try:
            request_stop(state.stop_reason)
        except Exception as e:  # noqa: BLE001
            log(f"could not forward the stop request: {e}")

    while not done.wait(poll_s):
        delivered = deliver()
        if state.user_error is not None and state.stop_requested_at is None:
            ask_stop("user_error")
        now = time.monotonic()
        # Also poll right after an event: a cancel decided in a callback takes effect at once.
        if state.stop_requested_at is None and (delivered or now - last_stop_poll >= stop_poll_s):
            last_stop_poll = now
            if should_stop():
                log("stop requested: stopping the run")
                ask_stop("cancel")
        if state.stop_requested_at is not None:
            waited = now - state.stop_requested_at
            if not state.forced and force_stop is not None and waited > grace_s:
                log(f"the run did not stop within {grace_s:.0f} s: stopping its workers")
                state.forced = True
                try:
                    force_stop()
                except Exception as e:  # noqa: BLE001
                    log(f"could not stop the workers: {e}")
            if waited > grace_s + give_up_s:
                log("the run still has not stopped; leaving it to Ray")
                return None, None, state
    deliver()
    return box.get("value"), box.get("error"), state


class LocalEvents:
    """A thread-safe event list for events produced in this process (e.g. Tune callbacks)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def push(self, kind: str, payload: Any) -> None:
        self._q.put((kind, payload))

    def drain(self) -> list[tuple[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out


__all__ = ["DriveState", "JobChannel", "LocalEvents", "cpus_per_worker", "describe_validation_error", "drive",
           "ensure_ray", "torch_threads_for"]
