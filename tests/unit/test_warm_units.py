"""Pieces of the warm path (workers/warm.py) that need no Ray: which state a run resumes from, the settings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workers.warm import idle_seconds, newest_state, warm_enabled


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_newest_state_takes_the_state_written_last_of_either_path(tmp_path: Path) -> None:
    assert newest_state(tmp_path) is None
    now = time.time()
    w1 = _touch(tmp_path / "warm" / "epoch-00001.pt", now - 30)
    ray2 = _touch(tmp_path / "checkpoint_2026-12-05_10-00-00.000000" / "state.pt", now - 20)
    assert newest_state(tmp_path) == ray2
    assert newest_state(tmp_path, warm_only=True) == w1  # the cold path falls back to warm states only
    w3 = _touch(tmp_path / "warm" / "epoch-00003.pt", now - 10)
    assert newest_state(tmp_path) == w3
    # neither the final state, temporary files nor other files count
    _touch(tmp_path / "warm" / "final.pt", now)
    _touch(tmp_path / "warm" / ".epoch-00004.pt.tmp", now)
    _touch(tmp_path / "checkpoint_x" / "other.bin", now)
    assert newest_state(tmp_path) == w3


@pytest.mark.parametrize(("raw", "on"), [(None, True), ("", True), ("0", False), ("no", False), (" Off ", False),
                                         ("false", False), ("1", True), ("true", True), (" ON ", True),
                                         ("yes", True)])
def test_warm_enabled_reads_re_warm_train(monkeypatch: pytest.MonkeyPatch, raw: str | None, on: bool) -> None:
    if raw is None:
        monkeypatch.delenv("RE_WARM_TRAIN", raising=False)
    else:
        monkeypatch.setenv("RE_WARM_TRAIN", raw)
    assert warm_enabled() is on


def test_a_mistyped_re_warm_train_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RE_WARM_TRAIN", "of")
    with pytest.raises(ValueError, match="RE_WARM_TRAIN must be one of .*'of'"):
        warm_enabled()


def test_idle_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RE_WARM_IDLE_SECONDS", raising=False)
    assert idle_seconds() == 120.0
    monkeypatch.setenv("RE_WARM_IDLE_SECONDS", "0")
    assert idle_seconds() == 0.0
    for bad in ("soon", "-1"):
        monkeypatch.setenv("RE_WARM_IDLE_SECONDS", bad)
        with pytest.raises(ValueError, match="RE_WARM_IDLE_SECONDS"):
            idle_seconds()


@pytest.mark.parametrize(("raw", "on"), [(None, True), ("", True), ("0", False), (" Off ", False), ("no", False),
                                         ("1", True), ("true", True), (" ON ", True), ("yes", True)])
def test_warm_ddp_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch, raw: str | None, on: bool) -> None:
    from workers.warm_ddp import warm_ddp_enabled

    if raw is None:
        monkeypatch.delenv("RE_WARM_DDP", raising=False)
    else:
        monkeypatch.setenv("RE_WARM_DDP", raw)
    assert warm_ddp_enabled() is on
    monkeypatch.setenv("RE_WARM_DDP", "of")
    with pytest.raises(ValueError, match="RE_WARM_DDP must be one of .*'of'"):
        warm_ddp_enabled()


def test_the_group_dispatcher_hands_out_one_job_at_a_time_and_again_after_a_restart() -> None:
    """The dispatcher's logic, without Ray (``GroupDispatcher`` is this class as an actor)."""
    import threading

    from workers.warm_ddp import Dispatcher

    d = Dispatcher()
    assert d.next_job(0.05) is None  # idle: the group closes ...
    assert d.submit({"key": "late"}) is False  # ... and takes no job after that

    d = Dispatcher()
    assert d.submit({"key": "a", "spec": 1}) and d.submit({"key": "b", "spec": 2})
    assert d.is_idle() is False
    a = d.next_job(1.0)
    assert a == {"key": "a", "spec": 1, "job_number": 1}
    assert d.next_job(1.0) == a  # handed out again until finished (Ray Train restarted the ranks)
    d.push("a", "epoch", {"epoch": 1})
    assert d.drain("a") == [("epoch", {"epoch": 1})] and d.drain("a") == []
    d.request_stop("a", "cancel")
    assert d.stop_reason("a") == "cancel" and d.stop_reason("b") is None
    assert d.wait("a", 0.01) is None
    threading.Timer(0.05, d.finish, args=("a", {"finished": True})).start()
    assert d.wait("a", 5.0) == {"finished": True}  # woken by finish
    assert d.stop_reason("a") is None
    assert d.next_job(1.0) == {"key": "b", "spec": 2, "job_number": 2}
    d.finish("b", {"stopped": True})
    assert d.is_idle() is True
    d.close()
    assert d.next_job(5.0) is None and d.submit({"key": "c"}) is False  # closed: at once


def test_the_demand_board_keeps_a_request_open_for_its_time_and_closes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import warm

    clock = [1000.0]
    monkeypatch.setattr(warm.time, "monotonic", lambda: clock[0])
    board = warm.DemandBoard()
    assert board.open_for() == 0.0 and board.requests() == 0
    assert board.request(60.0) == 1
    clock[0] += 45.0
    assert board.open_for() == pytest.approx(15.0)
    assert board.request(10.0) == 2  # a shorter request does not cut an open one short
    assert board.open_for() == pytest.approx(15.0)
    assert board.request(60.0) == 3  # a longer one extends it
    assert board.open_for() == pytest.approx(60.0)
    clock[0] += 60.0
    assert board.open_for() == 0.0
    board.request(60.0)
    board.close()
    assert board.open_for() == 0.0 and board.requests() == 4


class _Remote:
    def __init__(self, fn: object) -> None:
        self.remote = fn


class _FakeBoard:
    def __init__(self) -> None:
        self.asked: list[float] = []
        self.request = _Remote(lambda open_s: self.asked.append(open_s) or len(self.asked))


@pytest.mark.parametrize(("free", "cpus", "gpus", "asks"), [
    ({"CPU": 2.0}, 2.0, 0.0, False),  # fits exactly
    ({"CPU": 1.0}, 2.0, 0.0, True),  # one core short
    ({"CPU": 4.0}, 2.0, 1.0, True),  # no GPU free
    ({"CPU": 4.0, "GPU": 1.0}, 2.0, 1.0, False),
    ({}, 0.5, 0.0, True),  # nothing free at all
])
def test_ask_for_room_asks_the_other_workers_only_when_ray_has_too_little_free(
        monkeypatch: pytest.MonkeyPatch, free: dict[str, float], cpus: float, gpus: float, asks: bool) -> None:
    from workers import warm

    board = _FakeBoard()
    monkeypatch.setattr(warm.ray, "available_resources", lambda: dict(free))
    monkeypatch.setattr(warm.ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(warm, "demand_board", lambda: board)
    assert warm.ask_for_room(cpus, gpus) is asks
    assert board.asked == ([warm.DEMAND_OPEN_S] if asks else [])


def test_ask_for_room_waits_settle_s_for_freed_resources_to_show_before_asking(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import warm

    board = _FakeBoard()
    seen = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}])  # this process's freed actor shows on the third look
    monkeypatch.setattr(warm.ray, "available_resources", lambda: next(seen))
    monkeypatch.setattr(warm, "demand_board", lambda: board)
    assert warm.ask_for_room(2.0, settle_s=5.0) is False and board.asked == []


class _FakeGroup:
    """A live group whose dispatcher has no job (what a new group looks like before its job reaches it)."""

    def __init__(self, shape: tuple[int, float, bool]) -> None:
        self.shape = shape
        self.closed = False
        self.dispatcher = type("D", (), {"is_idle": _Remote(lambda: True)})()

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def test_a_group_held_by_a_job_is_never_closed_as_idle_even_before_its_job_reaches_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """release_idle() (this process's next run, or the demand watcher) between acquire() and the job's submit
    once closed the group under the job: its dispatcher still said idle."""
    from types import SimpleNamespace

    from workers import warm_ddp

    monkeypatch.setattr(warm_ddp.ray, "get", lambda ref, timeout=None: ref)
    pool = warm_ddp.GroupPool()
    spec = SimpleNamespace(workers=2, use_gpu=False)
    group = _FakeGroup(warm_ddp.group_shape(spec, 1.0))
    pool._groups[group.shape] = group  # type: ignore[assignment]
    kwargs = {"max_failures": 0, "scaling_config": None, "torch_config": None}
    assert pool.acquire(spec, 1.0, 1, "/nowhere", **kwargs) == (group, True)
    assert pool.acquire(spec, 1.0, 1, "/nowhere", **kwargs) == (group, True)  # a second job queued on it
    assert pool.release_idle() == 0 and not group.closed
    pool.done(group)  # type: ignore[arg-type]
    assert pool.release_idle() == 0 and not group.closed  # the second job still holds it
    pool.done(group)  # type: ignore[arg-type]
    assert pool.release_idle() == 1 and group.closed and pool.live_count() == 0
