"""TensorBoard event files of a train job's per-epoch metrics, written in pure Python.

An event file is a sequence of TFRecords, each framing one serialized ``tensorflow.Event`` protobuf::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

(all little-endian). The first event carries ``file_version = "brain.Event:2"``; then a
``SessionLog.START`` at the first step written, and one event per epoch with a ``Summary`` holding one
``simple_value`` per metric, at ``step`` = the global epoch. The protobuf fields are encoded by hand
(``Event``: wall_time = 1 double, step = 2 int64, file_version = 3 string, summary = 5, session_log = 7;
``Summary``: value = 1 repeated; ``Summary.Value``: tag = 1 string, simple_value = 2 float;
``SessionLog``: status = 1 enum, START = 1), so neither TensorFlow nor TensorBoard is needed to write them;
``tensorboard --logdir <dir>`` reads them.

The worker writes one file per attempt under the job's artifacts (``tensorboard/``). An attempt that
resumes at an epoch the previous attempt had already reported starts with ``SessionLog.START`` at that
step, and TensorBoard then drops the previous attempt's orphaned points from that step on.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
FILE_VERSION = "brain.Event:2"
SESSION_START = 1  # SessionLog.SessionStatus.START
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord framing ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ------------------------------------------------------------------------------------------ protobuf
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf encodes it: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def summary_value(tag: str, value: float) -> bytes:
    """``Summary.Value{tag, simple_value}`` serialized."""
    return _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value)


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
    """An ``Event`` serialized: a file-version header, a ``SessionLog.START`` or a summary of scalars at
    ``step`` (give exactly one of them: they are one ``oneof`` in the protobuf)."""
    if (file_version is not None) + bool(scalars) + session_start != 1:
        raise ValueError("an event carries exactly one of file_version, scalars and session_start")
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode("utf-8"))
    if session_start:
        out += _length_delimited(7, _key(1, 0) + _varint(SESSION_START))
    if scalars:
        summary = b"".join(_length_delimited(1, summary_value(tag, v)) for tag, v in scalars.items())
        out += _length_delimited(5, summary)
    return out


def finite_scalars(values: Mapping[str, object]) -> dict[str, float]:
    """The finite real numbers of ``values`` (booleans, strings, NaN and infinities left out)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[str(k)] = float(v)
    return out


class EventFileWriter:
    """Appends scalar summaries to one ``events.out.tfevents.*`` file in ``logdir``.

    Every call opens, appends and closes the file, so a reader (or a download of the artifact) always
    sees whole records, and nothing stays open between epochs.
    """

    def __init__(self, logdir: str | Path, *, suffix: str = "") -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}{suffix}"
        self.path = self.logdir / name
        self._started = False
        self._append(event(time.time(), file_version=FILE_VERSION))

    def _append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(tfrecord(data))

    def add_scalars(self, step: int, values: Mapping[str, object], wall_time: float | None = None) -> int:
        """Write the finite numbers of ``values`` at ``step``; returns how many were written."""
        scalars = finite_scalars(values)
        if scalars:
            at = time.time() if wall_time is None else wall_time
            if not self._started:  # where this run (attempt) starts: TensorBoard purges later points of older runs
                self._append(event(at, int(step), session_start=True))
                self._started = True
            self._append(event(at, int(step), scalars=scalars))
        return len(scalars)


__all__ = ["FILE_VERSION", "TENSORBOARD_DIR", "EventFileWriter", "crc32c", "event", "finite_scalars",
           "masked_crc32c", "summary_value", "tfrecord"]
