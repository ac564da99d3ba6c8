"""On-device gallery index: a flat file of image embeddings, and brute-force top-k search.

File layout (little-endian), a 40-byte header then the rows:

  0  magic      8s   b"MCADIDX\\0"
  8  version    u32  1
  12 dtype      u32  1 = float16, 2 = int8 (value = round(x * 127), symmetric)
  16 count      u64  number of embeddings N
  24 dim        u32  embedding width E
  28 scale      f32  int8: the float value of one step (1/127); float16: 1.0
  32 data_crc   u32  CRC-32 of the N*E rows
  36 head_crc   u32  CRC-32 of bytes 0..36
  40 rows       N*E  float16 or int8, row-major

Embeddings are unit-norm, so a single symmetric scale loses little, and an int8
gallery is scored with an int32 dot product against an int8 query, as a phone's
integer kernels would. Search is exhaustive, like the papers' phones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
import zlib

import numpy as np

from mcad_jax import fileio

MAGIC = b"MCADIDX\0"
VERSION = 1
_HEAD = struct.Struct("<8sIIQIfII")
HEADER_BYTES = _HEAD.size  # 40
DTYPES = {"fp16": (1, np.float16), "int8": (2, np.int8)}
_CODES = {code: (name, dt) for name, (code, dt) in DTYPES.items()}


class IndexFileError(ValueError):
  """An index file that is missing, truncated, corrupt or of another format."""


@dataclasses.dataclass
class Index:
  """Gallery embeddings as stored: `rows` [N, E] float16 or int8, `scale` per int8 step."""

  rows: np.ndarray
  scale: float

  @property
  def dtype(self) -> str:
    return "int8" if self.rows.dtype == np.int8 else "fp16"

  def __len__(self) -> int:
    return len(self.rows)

  @classmethod
  def build(cls, emb: np.ndarray, dtype: str = "int8") -> "Index":
    """From float embeddings [N, E] (unit norm)."""
    if dtype not in DTYPES:
      raise ValueError(f"unknown index dtype {dtype!r}; known {tuple(DTYPES)}")
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 2:
      raise ValueError(f"embeddings must be [N, E], got shape {emb.shape}")
    if dtype == "fp16":
      return cls(emb.astype(np.float16), 1.0)
    return cls(np.clip(np.round(emb * 127.0), -127, 127).astype(np.int8), 1.0 / 127.0)

  def save(self, path: str) -> None:
    """Writes atomically (temp file + rename), so a crash never leaves a half index."""
    rows = np.ascontiguousarray(self.rows)
    data = rows.tobytes()
    code = DTYPES[self.dtype][0]
    head = _HEAD.pack(MAGIC, VERSION, code, rows.shape[0], rows.shape[1], self.scale,
                      zlib.crc32(data), 0)[:36]
    fileio.atomic_write(path, head + struct.pack("<I", zlib.crc32(head)) + data)

  @classmethod
  def load(cls, path: str, verify: bool = True) -> "Index":
    if not os.path.isfile(path):
      raise IndexFileError(f"{path}: no such index file")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
      raise IndexFileError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
      head = f.read(HEADER_BYTES)
      magic, version, code, n, dim, scale, data_crc, head_crc = _HEAD.unpack(head)
      if magic != MAGIC:
        raise IndexFileError(f"{path}: not an mcad index (magic {magic!r})")
      if zlib.crc32(head[:36]) != head_crc:
        raise IndexFileError(f"{path}: header checksum mismatch (corrupt header)")
      if version != VERSION:
        raise IndexFileError(f"{path}: index version {version}, this code reads {VERSION}")
      if code not in _CODES:
        raise IndexFileError(f"{path}: unknown dtype code {code}")
      dt = _CODES[code][1]
      want = HEADER_BYTES + n * dim * np.dtype(dt).itemsize
      if size != want:
        raise IndexFileError(f"{path}: {size} bytes, header says {want} ({n} x {dim} "
                             f"{_CODES[code][0]}); truncated or padded")
      data = f.read()
    if verify and zlib.crc32(data) != data_crc:
      raise IndexFileError(f"{path}: data checksum mismatch (corrupt rows)")
    return cls(np.frombuffer(data, dt).reshape(n, dim), float(scale))

  def scores(self, query: np.ndarray) -> np.ndarray:
    """Dot products of float queries [Q, E] with every row -> [Q, N] float32."""
    q = np.atleast_2d(np.asarray(query, np.float32))
    if q.shape[1] != self.rows.shape[1]:
      raise ValueError(f"query width {q.shape[1]} != index width {self.rows.shape[1]}")
    rows = self._rows_float
    if self.dtype == "fp16":
      return q @ rows.T
    qi = np.clip(np.round(q * 127.0), -127, 127).astype(rows.dtype)
    return (qi @ rows.T).astype(np.float32) * np.float32(self.scale / 127.0)

  @functools.cached_property
  def _rows_float(self) -> np.ndarray:
    """The rows as a float copy, made once: numpy has no fast fp16 or int8 matmul (a phone
    runs fp16 / int8 dot-product kernels on the stored rows instead). int8 dot products stay
    exact: float32 holds every sum of E products of int8s while E * 127^2 < 2^24 (E <= 1040),
    float64 beyond."""
    exact32 = self.dtype == "fp16" or self.rows.shape[1] * 127 * 127 < 2**24
    return self.rows.astype(np.float32 if exact32 else np.float64)

  def search(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by dot product: (indices [Q, k], scores [Q, k]), best first."""
    s = self.scores(query)
    k = min(k, s.shape[1])
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
    idx = np.take_along_axis(top, order, 1)
    return idx, np.take_along_axis(s, idx, 1)
