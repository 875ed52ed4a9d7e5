"""Per-example evaluation state, saved as it goes so a long evaluation resumes after an interruption.

In the spirit of AutoAttack's ``EvaluationState``: a JSON file holds, for every example of this shard,
one character per *column* (``1`` correct / robust, ``0`` wrong / fooled, ``-`` not part of that
unit's example set, ``?`` not computed yet), a few float columns (CW-L2 distances), counters, and the
set of finished ``(unit, batch)`` pieces. Work is redone only for pieces that are not in ``done``; the
file is replaced atomically. States of shards over consecutive example ranges merge by concatenation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

STATE_FORMAT = "robust-ensembles/eval-state-v1"


def column(model: str, *parts: Any) -> str:
    """The key of one per-example column of an :class:`EvalState`: ``model|part|...`` (floats as ``%g``)."""
    return "|".join([model, *[p if isinstance(p, str) else f"{p:g}" if isinstance(p, float) else str(p)
                              for p in parts]])


class StateMismatch(ValueError):
    """A state file belongs to another evaluation (different spec, models or examples)."""


class EvalState:
    """Per-example columns for the examples ``[lo, hi)`` of an evaluation's example list."""

    def __init__(self, fingerprint: str, lo: int, hi: int) -> None:
        self.fingerprint, self.lo, self.hi = fingerprint, lo, hi
        self.columns: dict[str, bytearray] = {}
        self.floats: dict[str, list[float | None]] = {}
        self.counters: dict[str, int] = {}
        self.done: set[str] = set()
        self.timings: dict[str, float] = {}
        self._last_save = time.monotonic()

    @property
    def n(self) -> int:
        return self.hi - self.lo

    # ---------------------------------------------------------------------------------- columns
    def column(self, key: str) -> bytearray:
        if key not in self.columns:
            self.columns[key] = bytearray(b"?" * self.n)
        return self.columns[key]

    def set_bools(self, key: str, positions: torch.Tensor | range, values: torch.Tensor,
                  mask: torch.Tensor | None = None) -> None:
        """Write ``values`` (bool) at global ``positions``; rows where ``mask`` is False get ``-``."""
        col = self.column(key)
        pos = list(positions) if isinstance(positions, range) else positions.tolist()
        vals = values.tolist()
        m = mask.tolist() if mask is not None else [True] * len(pos)
        for p, v, keep in zip(pos, vals, m, strict=True):
            col[p - self.lo] = (49 if v else 48) if keep else 45  # '1' '0' '-'

    def get_bools(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """``True`` where the column says ``1`` for global positions ``[lo, hi)``."""
        col = self.columns[key]
        return torch.tensor([c == 49 for c in col[lo - self.lo : hi - self.lo]], dtype=torch.bool)

    def set_floats(self, key: str, positions: range, values: list[float | None]) -> None:
        if key not in self.floats:
            self.floats[key] = [None] * self.n
        for p, v in zip(positions, values, strict=True):
            self.floats[key][p - self.lo] = v

    def add(self, counter: str, value: int) -> None:
        if value:
            self.counters[counter] = self.counters.get(counter, 0) + int(value)

    # ------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "lo": self.lo, "hi": self.hi,
                "columns": {k: v.decode() for k, v in sorted(self.columns.items())},
                "floats": dict(sorted(self.floats.items())), "counters": dict(sorted(self.counters.items())),
                "done": sorted(self.done), "timings": self.timings}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalState:
        if d.get("format") != STATE_FORMAT:
            raise StateMismatch("not an evaluation state file")
        st = cls(d["fingerprint"], int(d["lo"]), int(d["hi"]))
        st.columns = {k: bytearray(v.encode()) for k, v in d["columns"].items()}
        st.floats = {k: list(v) for k, v in d["floats"].items()}
        st.counters = {k: int(v) for k, v in d["counters"].items()}
        st.done = set(d["done"])
        st.timings = {k: float(v) for k, v in d.get("timings", {}).items()}
        return st

    def save(self, path: str | Path) -> None:
        """Atomic write (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last_save = time.monotonic()

    def maybe_save(self, path: str | Path | None, every_s: float) -> None:
        if path is not None and time.monotonic() - self._last_save >= every_s:
            self.save(path)

    @classmethod
    def load_or_new(cls, path: str | Path | None, fingerprint: str, lo: int, hi: int,
                    log: Any = None) -> EvalState:
        """Resume from ``path`` when it holds this evaluation's state, else start afresh."""
        if path is not None and Path(path).exists():
            try:
                st = cls.from_dict(json.loads(Path(path).read_text()))
            except (json.JSONDecodeError, KeyError, StateMismatch) as e:
                if log:
                    log(f"ignoring unreadable evaluation state {path}: {e}")
            else:
                if st.fingerprint == fingerprint and (st.lo, st.hi) == (lo, hi):
                    if log:
                        log(f"resuming evaluation from {path} ({len(st.done)} pieces done)")
                    return st
                if log:
                    log(f"evaluation state {path} belongs to another evaluation; starting afresh")
        return cls(fingerprint, lo, hi)

    @classmethod
    def merge(cls, states: list[EvalState]) -> EvalState:
        """Concatenate shard states over consecutive ranges (keys missing in a shard read as ``?``)."""
        states = sorted(states, key=lambda s: s.lo)
        for a, b in zip(states, states[1:], strict=False):
            if a.hi != b.lo:
                raise ValueError(f"shard ranges do not tile: [{a.lo},{a.hi}) then [{b.lo},{b.hi})")
        if len({s.fingerprint for s in states}) != 1:
            raise StateMismatch("shards of different evaluations")
        out = cls(states[0].fingerprint, states[0].lo, states[-1].hi)
        keys = sorted({k for s in states for k in s.columns})
        for k in keys:
            out.columns[k] = bytearray(b"".join(bytes(s.columns.get(k, b"?" * s.n)) for s in states))
        for k in sorted({k for s in states for k in s.floats}):
            out.floats[k] = [v for s in states for v in s.floats.get(k, [None] * s.n)]
        for s in states:
            for k, v in s.counters.items():
                out.counters[k] = out.counters.get(k, 0) + v
            for k, v in s.timings.items():
                out.timings[k] = out.timings.get(k, 0.0) + v
        # A piece is done overall when every shard finished it for its own batches.
        out.done = set().union(*(s.done for s in states))
        return out
