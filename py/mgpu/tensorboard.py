"""A TensorBoard scalar writer with no dependency: ``tensorboard --logdir <output-dir>/tb`` reads it.

torch.utils.tensorboard needs the tensorboard package (grpcio, protobuf, werkzeug...) only to write a
few numbers. Scalars need much less: an event file is a sequence of TFRecords (length, masked CRC-32C
of the length, payload, masked CRC-32C of the payload) whose payloads are ``Event`` protocol buffers:
``wall_time`` (field 1, double), ``step`` (2, int64), ``file_version`` (3, string) or ``summary`` (5),
a ``Summary`` holding ``Value``s of ``tag`` (1, string) and ``simple_value`` (2, float). The tests read
what this writes back with tensorboard's own loader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes) -> int:
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, file_version: str | None = None, scalars: dict[str, float] | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                                       + struct.pack("<f", float(value))) for tag, value in scalars.items())
        out += _field_bytes(5, values)
    return out


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class ScalarWriter:
    """add_scalars({"train/loss": 0.7}, step) appends one event; each write is flushed, so a run that
    dies keeps every point written before it."""

    def __init__(self, logdir: str | os.PathLike):
        self.dir = Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.mgpu"
        self._file = open(self.path, "ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        self._file.write(_record(payload))
        self._file.flush()

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._write(_event(step, scalars=scalars))

    def close(self) -> None:
        self._file.close()
