"""``workers.ray_common.drive``: the caller's loop around a blocking ``fit()`` (no Ray needed).

It must deliver events on the calling thread, forward a stop request once ``should_stop`` turns true
(right after an event, not only on the slow poll), force the stop after the grace period, and hand
back ``fit``'s value or exception.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from workers.ray_common import DriveState, LocalEvents, describe_validation_error, drive


def test_events_are_delivered_on_the_calling_thread_and_the_value_returned() -> None:
    events = LocalEvents()
    seen: list[tuple[str, Any, int]] = []
    flushes: list[int] = []

    def fit() -> str:
        for i in range(3):
            events.push("epoch", {"epoch": i + 1})
            time.sleep(0.05)
        return "done"

    value, error, state = drive(fit, drain=events.drain,
                                handle=lambda k, p, s: seen.append((k, p, threading.get_ident())),
                                flush=lambda: flushes.append(1), should_stop=lambda: False,
                                request_stop=lambda r: pytest.fail("no stop was asked"), poll_s=0.01)
    assert value == "done" and error is None and state.stop_reason is None
    assert [p["epoch"] for _, p, _ in seen] == [1, 2, 3]
    assert {t for _, _, t in seen} == {threading.get_ident()}
    assert 1 <= len(flushes) <= 3


def test_a_stop_decided_in_a_callback_is_forwarded_at_once_and_forced_after_the_grace() -> None:
    events = LocalEvents()
    forced = threading.Event()
    requested: list[tuple[str, float]] = []
    epochs: list[int] = []

    def fit() -> None:
        events.push("epoch", 1)
        # a "run" that ignores the stop request until it is forced
        assert forced.wait(10)
        raise RuntimeError("workers killed")

    def handle(kind: str, payload: Any, state: DriveState) -> None:
        epochs.append(payload)

    t0 = time.monotonic()
    value, error, state = drive(
        fit, drain=events.drain, handle=handle, should_stop=lambda: bool(epochs),
        request_stop=lambda r: requested.append((r, time.monotonic() - t0)), force_stop=forced.set,
        poll_s=0.01, stop_poll_s=60.0, grace_s=0.3)
    assert value is None and isinstance(error, RuntimeError)
    assert state.stop_reason == "cancel" and state.forced
    assert [r for r, _ in requested] == ["cancel"]
    assert requested[0][1] < 1.0  # polled right after the event, not after stop_poll_s = 60 s


def test_a_user_error_event_stops_the_run() -> None:
    events = LocalEvents()
    release = threading.Event()
    requested: list[str] = []

    def fit() -> dict[str, str]:
        events.push("user_error", "val_size: too large")
        assert release.wait(10)
        return {"user_error": "val_size: too large"}

    def handle(kind: str, payload: Any, state: DriveState) -> None:
        if kind == "user_error":
            state.user_error = payload

    def request_stop(reason: str) -> None:
        requested.append(reason)
        release.set()

    _, error, state = drive(fit, drain=events.drain, handle=handle, should_stop=lambda: False,
                            request_stop=request_stop, poll_s=0.01)
    assert error is None and state.user_error == "val_size: too large" and requested == ["user_error"]


def test_validation_errors_are_described_by_field() -> None:
    from pydantic import ValidationError

    from ensemble_core.spec import TrainSpec

    with pytest.raises(ValidationError) as info:
        TrainSpec.model_validate({"members": 0, "optimizer": {"lr": -1}})
    text = describe_validation_error(info.value)
    assert "members:" in text and "optimizer.lr:" in text
