"""TensorBoard scalars without TensorFlow: a minimal event-file writer.

An event file is a TFRecord stream of `Event` protos: each record is
[uint64 length][masked CRC-32C of the length][Event bytes][masked CRC-32C of
the bytes]. We encode only what scalars need (wall_time, step, file_version,
summary.value{tag, simple_value}) by hand, so `mcad_jax` stays importable and
light with no TensorFlow or tensorboard package. Tests read the files back
with TensorFlow's own reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected.
_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
  _TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def _event(step: int, wall_time: float, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _len_field(3, file_version.encode())
  if scalars:
    values = b"".join(_len_field(1, _len_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                      for tag, v in scalars.items())
    msg += _len_field(5, values)
  return msg


class SummaryWriter:
  """Appends scalar events to `logdir/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._write(_event(0, time.time(), file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    head = struct.pack("<Q", len(data))
    self._f.write(head + struct.pack("<I", _masked(head)) + data + struct.pack("<I", _masked(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(_event(step, time.time(), scalars={k: float(v) for k, v in values.items()}))
    self._f.flush()

  def close(self) -> None:
    self._f.close()
