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
