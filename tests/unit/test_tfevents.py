"""The pure-Python TensorBoard event writer, read back with TensorBoard's own reader and protobufs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c

from workers.tfevents import EventFileWriter, crc32c, event, finite_scalars, masked_crc32c, tfrecord


def _records(path: Path) -> list[bytes]:
    """Split a TFRecord file, checking both CRCs of every record."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert len_crc == tb_masked_crc32c(header)
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert body_crc == tb_masked_crc32c(body)
        out.append(body)
        pos += 16 + length
    assert pos == len(data)
    return out


def test_crc32c_known_vectors() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector: 32 zero bytes
    for payload in (b"", b"a", b"hello world" * 13, bytes(range(256))):
        assert masked_crc32c(payload) == tb_masked_crc32c(payload)


def test_event_encoding_matches_the_protobuf() -> None:
    raw = event(1234.5, 7, scalars={"train_loss": 0.25, "sel_clean_acc": 0.9375})
    ev = event_pb2.Event.FromString(raw)
    assert ev.wall_time == 1234.5 and ev.step == 7
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("train_loss", 0.25), ("sel_clean_acc", 0.9375)]
    header = event_pb2.Event.FromString(event(1.0, file_version="brain.Event:2"))
    assert header.file_version == "brain.Event:2" and header.step == 0
    big = event_pb2.Event.FromString(event(0.0, 2**40 + 3, scalars={"x": -1.5}))
    assert big.step == 2**40 + 3 and big.summary.value[0].simple_value == -1.5
    start = event_pb2.Event.FromString(event(2.0, 5, session_start=True))
    assert start.step == 5 and start.session_log.status == event_pb2.SessionLog.START
    assert len(tfrecord(raw)) == len(raw) + 16
    with pytest.raises(ValueError):
        event(1.0, 1, file_version="brain.Event:2", scalars={"x": 1.0})


def test_finite_scalars_drops_non_numbers() -> None:
    got = finite_scalars({"a": 1, "b": 0.5, "stage_name": "train", "flag": True, "nan": float("nan"),
                          "inf": float("inf")})
    assert got == {"a": 1.0, "b": 0.5}


def test_tensorboard_reads_the_file(tmp_path: Path) -> None:
    w = EventFileWriter(tmp_path / "tb", suffix=".attempt1")
    assert w.path.name.startswith("events.out.tfevents.") and w.path.name.endswith(".attempt1")
    history = [{"train_loss": 2.0 / s, "sel_clean_acc": 0.5 + 0.1 * s, "stage_name": "all"} for s in (1, 2, 3)]
    for step, metrics in enumerate(history, start=1):
        assert w.add_scalars(step, metrics, wall_time=100.0 + step) == 2
    assert w.add_scalars(4, {"stage_name": "x"}) == 0

    records = [event_pb2.Event.FromString(r) for r in _records(w.path)]
    assert len(records) == 5  # the version header, the run's start and three epochs
    assert records[0].file_version == "brain.Event:2"
    assert records[1].session_log.status == event_pb2.SessionLog.START and records[1].step == 1
    assert [r.step for r in records[2:]] == [1, 2, 3]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["sel_clean_acc", "train_loss"]
    loss = acc.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([2.0, 1.0, 2.0 / 3], rel=1e-6)  # float32 precision
    assert [e.wall_time for e in loss] == [101.0, 102.0, 103.0]
    assert [e.value for e in acc.Scalars("sel_clean_acc")] == pytest.approx([0.6, 0.7, 0.8], rel=1e-6)


def test_a_redone_epoch_replaces_the_orphaned_points(tmp_path: Path) -> None:
    """Attempt 1 reached epoch 3; attempt 2 resumed at epoch 2: TensorBoard keeps attempt 2's points."""
    first = EventFileWriter(tmp_path, suffix=".attempt1")
    for step in (1, 2, 3):
        first.add_scalars(step, {"train_loss": float(step)})
    second = EventFileWriter(tmp_path, suffix=".attempt2")
    assert second.path != first.path
    for step in (2, 3, 4):
        second.add_scalars(step, {"train_loss": 10.0 * step})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train_loss")]
    assert got == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
