"""Per-example evaluation state: columns, atomic save / resume, fingerprint mismatch, shard merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ensemble_core.evaluation.state import EvalState, StateMismatch


def test_columns_roundtrip(tmp_path: Path) -> None:
    st = EvalState("fp", 10, 14)
    st.set_bools("m|clean", range(10, 14), torch.tensor([True, False, True, True]),
                 mask=torch.tensor([True, True, False, True]))
    assert st.columns["m|clean"].decode() == "10-1"
    assert st.get_bools("m|clean", 10, 14).tolist() == [True, False, False, True]
    st.set_floats("m|dist", range(10, 14), [0.5, None, 1.25, None])
    st.add("invalid", 2)
    st.add("invalid", 0)
    st.done.add("wb|0|0.1|b3")
    path = tmp_path / "s.json"
    st.save(path)
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed
    back = EvalState.load_or_new(path, "fp", 10, 14)
    assert back.to_dict() == st.to_dict()
    assert back.counters == {"invalid": 2}


def test_unwritten_positions_read_as_not_done() -> None:
    st = EvalState("fp", 0, 3)
    st.set_bools("k", range(0, 2), torch.tensor([True, True]))
    assert st.columns["k"].decode() == "11?"


def test_mismatch_and_corruption_start_afresh(tmp_path: Path) -> None:
    st = EvalState("fp", 0, 2)
    st.done.add("x")
    path = tmp_path / "s.json"
    st.save(path)
    logs: list[str] = []
    assert EvalState.load_or_new(path, "other", 0, 2, logs.append).done == set()
    assert "another evaluation" in logs[-1]
    assert EvalState.load_or_new(path, "fp", 0, 3, logs.append).done == set()  # another shard range
    path.write_text("{not json")
    assert EvalState.load_or_new(path, "fp", 0, 2, logs.append).done == set()
    assert "unreadable" in logs[-1]
    with pytest.raises(StateMismatch):
        EvalState.from_dict({"format": "something else"})


def test_merge_concatenates_and_sums() -> None:
    a, b = EvalState("fp", 0, 2), EvalState("fp", 2, 5)
    a.set_bools("k", range(0, 2), torch.tensor([True, False]))
    b.set_bools("k", range(2, 5), torch.tensor([False, True, True]))
    b.set_bools("only_b", range(2, 5), torch.tensor([True, True, True]))
    a.set_floats("d", range(0, 2), [1.0, None])
    a.add("c", 1)
    b.add("c", 2)
    a.done.add("u|b0")
    b.done.add("u|b1")
    m = EvalState.merge([b, a])
    assert (m.lo, m.hi) == (0, 5)
    assert m.columns["k"].decode() == "10011"
    assert m.columns["only_b"].decode() == "??111"
    assert m.floats["d"] == [1.0, None, None, None, None]
    assert m.counters == {"c": 3} and m.done == {"u|b0", "u|b1"}
    json.dumps(m.to_dict())
    with pytest.raises(ValueError, match="do not tile"):
        EvalState.merge([EvalState("fp", 0, 2), EvalState("fp", 3, 5)])
    with pytest.raises(StateMismatch):
        EvalState.merge([EvalState("fp", 0, 2), EvalState("other", 2, 5)])
