"""On-device gallery index: a flat file of image embeddings, and brute-force top-k search.

File layout (little-endian), a 40-byte header then the rows:

  0  magic      8s   b"MCADIDX\\0"
  8  version    u32  1
  12 dtype      u32  1 = float16, 2 = int8 (value = round(x / scale), symmetric)
  16 count      u64  number of embeddings N
  24 dim        u32  embedding width E
  28 scale      f32  int8: the float value of one step (max |x| over the gallery / 127, so
                     the largest entry maps to 127); float16: 1.0
  32 data_crc   u32  CRC-32 of the N*E rows
  36 head_crc   u32  CRC-32 of bytes 0..36
  40 rows       N*E  float16 or int8, row-major

Embeddings are unit-norm, so a single symmetric scale loses little. A query
stays float and is scored against the dequantized rows (row * scale): quantizing
the query too cost recall (BENCHMARKS.md, "Search at scale"). Search is
exhaustive, like the papers' phones. With `faiss-cpu` installed (extra
`search`) the stored rows are handed to a faiss scalar-quantizer index that
decodes them on the fly (faster than numpy, no float copy of the gallery); the
file format is ours either way, so a phone reads it without faiss. A query
process holds the gallery in memory (faiss's codes the one copy) or streams it
from the file at each query in bounded memory (`open_for_search`). faiss's
on-disk options memory-map the file (IO_FLAG_MMAP; OnDiskInvertedLists is for
IVF), and mapped pages a scan touches count in the process's memory, so the
streamed pass is ours: it reads each block into a block-sized faiss index's code
array (plain reads, one buffer) and merges each block's top-k.
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
BLOCK_BYTES = 4 << 20  # A pass over the gallery reads it in blocks of this size.


def has_faiss() -> bool:
  """Whether faiss-cpu is installed (extra `search`)."""
  import importlib.util

  return importlib.util.find_spec("faiss") is not None


MEMORY = ("resident", "stream")


def open_for_search(path: str, memory: str = "resident") -> "Index":
  """An index file as a query process should hold it, ready to search.

  'resident': with faiss, the rows stay on disk (checked block by block) and faiss's codes are
  the one copy in memory; without it, the rows are read. The search backend is built here, so
  the first query's time is a search's.
  'stream': the rows stay on disk and every search reads them again, one block at a time, into
  one reused buffer: the process holds a block, not the gallery (BENCHMARKS.md: a 100k int8
  gallery's query process in 47 fewer MiB), and each query pays a pass over the file, from the
  page cache while the OS keeps it there.
  """
  if memory not in MEMORY:
    raise ValueError(f"unknown index memory mode {memory!r}; known {MEMORY}")
  if memory == "stream":
    return dataclasses.replace(Index.load(path, lazy=True), stream=True).prepare()
  return Index.load(path, lazy=has_faiss()).prepare()


class IndexFileError(ValueError):
  """An index file that is missing, truncated, corrupt or of another format."""


class RowFile:
  """The rows of an index file, left on disk: `rows[idx]` reads just those rows (`os.pread`).

  For re-ranking a few candidates against a fine gallery without holding it: a memory map
  would do the same, but the page cache's read-ahead and fault-around map far more than the
  rows touched (most of a 1M-row file within a few searches, in a scratch test), which a phone
  pays in resident memory.
  """

  def __init__(self, path: str, dtype, n: int, dim: int):
    self.path, self.dtype, self.shape = path, np.dtype(dtype), (n, dim)
    self._row = dim * self.dtype.itemsize
    self._fd = os.open(path, os.O_RDONLY)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> np.ndarray:
    if isinstance(idx, slice):  # A block of consecutive rows: one read.
      a, b, step = idx.indices(self.shape[0])
      if step != 1:
        raise IndexError("RowFile slices take consecutive rows (step 1)")
      n = max(0, b - a)
      buf = os.pread(self._fd, n * self._row, HEADER_BYTES + a * self._row)
      return np.frombuffer(buf, self.dtype).reshape(n, self.shape[1])
    idx = np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
      raise IndexError(f"rows {idx.min()}..{idx.max()} of a {self.shape[0]}-row file")
    out = np.empty(idx.shape + (self.shape[1],), self.dtype)
    flat = out.reshape(-1, self.shape[1])
    for j, i in enumerate(idx.reshape(-1)):
      flat[j] = np.frombuffer(os.pread(self._fd, self._row, HEADER_BYTES + int(i) * self._row),
                              self.dtype)
    return out

  def blocks(self):
    """The rows in consecutive blocks of about BLOCK_BYTES (a pass over the file in bounded
    memory)."""
    rows = self.block_rows
    for a in range(0, self.shape[0], rows):
      yield self[a:a + rows]

  @property
  def block_rows(self) -> int:
    return max(1, BLOCK_BYTES // self._row)

  def read_into(self, a: int, out: np.ndarray) -> int:
    """Reads rows a.. into `out`, a reused uint8 buffer [rows, row bytes] (so a pass over the
    file allocates nothing), as many as fit; returns how many were read."""
    n = min(len(out), self.shape[0] - a)
    view = memoryview(out.reshape(-1))[:n * self._row]
    got = 0
    while got < len(view):  # pread may return short; loop until the rows are in.
      r = os.preadv(self._fd, [view[got:]], HEADER_BYTES + a * self._row + got)
      if r <= 0:
        raise IndexFileError(f"{self.path}: the file ended at row {a + got // self._row}")
      got += r
    return n

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


@dataclasses.dataclass
class Index:
  """Gallery embeddings as stored: `rows` [N, E] float16 or int8, `scale` per int8 step."""

  rows: np.ndarray
  scale: float
  stream: bool = False  # Rows on disk (a RowFile), read per search (`open_for_search`).

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
    # The gallery's own range, not a fixed 1/127: unit vectors of width E rarely have an entry
    # near 1, and finer steps raised recall@10 on a 1M gallery (BENCHMARKS.md).
    scale = float(np.abs(emb).max()) / 127.0 or 1.0 / 127.0
    return cls(np.clip(np.round(emb / scale), -127, 127).astype(np.int8), scale)

  def save(self, path: str) -> None:
    """Writes atomically (temp file + rename), so a crash never leaves a half index."""
    rows = np.ascontiguousarray(self.rows)
    data = rows.tobytes()
    code = DTYPES[self.dtype][0]
    head = _HEAD.pack(MAGIC, VERSION, code, rows.shape[0], rows.shape[1], self.scale,
                      zlib.crc32(data), 0)[:36]
    fileio.atomic_write(path, head + struct.pack("<I", zlib.crc32(head)) + data)

  @classmethod
  def load(cls, path: str, verify: bool = True, lazy: bool = False) -> "Index":
    """Reads and checks an index file. With `lazy` the rows stay on disk and only the rows asked
    for are read (`RowFile`: a re-ranking file, or the blocks faiss copies); `verify` then reads
    the file once, block by block (pass False for a re-ranking file that is only sampled)."""
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
      if lazy:
        rows = RowFile(path, dt, n, dim)
        if verify:  # Block by block: the check never holds the gallery.
          crc = 0
          for block in rows.blocks():
            crc = zlib.crc32(block, crc)
          if crc != data_crc:
            raise IndexFileError(f"{path}: data checksum mismatch (corrupt rows)")
        return cls(rows, float(scale))
      data = f.read()
    if verify and zlib.crc32(data) != data_crc:
      raise IndexFileError(f"{path}: data checksum mismatch (corrupt rows)")
    return cls(np.frombuffer(data, dt).reshape(n, dim), float(scale))

  def _query(self, query: np.ndarray) -> np.ndarray:
    q = np.atleast_2d(np.asarray(query, np.float32))
    if q.ndim != 2 or q.shape[1] != self.rows.shape[1]:
      raise ValueError(f"query width {q.shape[-1]} != index width {self.rows.shape[1]}")
    return np.ascontiguousarray(q)

  def scores(self, query: np.ndarray) -> np.ndarray:
    """Dot products of float queries [Q, E] with every dequantized row -> [Q, N] float32."""
    q = self._query(query)
    return (q @ self._rows_float.T) * np.float32(self.scale)

  def prepare(self) -> "Index":
    """Builds the search backend now (faiss's index, or numpy's float rows), not at the first
    query; returns self. A streamed index builds its block buffer (each search reads the file)."""
    if self.stream:
      self._stream_buffer  # noqa: B018  (a cached property, built for its side effect)
      return self
    if self._faiss is None:
      self._rows_float  # noqa: B018  (a cached property, built for its side effect)
    return self

  @functools.cached_property
  def _rows_float(self) -> np.ndarray:
    """The stored rows as a float32 copy, made once, for the numpy path (no faiss): numpy has no
    fast fp16 or int8 matrix product."""
    return np.asarray(self.rows[0:len(self)]).astype(np.float32)

  def _sq_index(self, n: int):
    """An empty faiss scalar-quantizer index with room for n rows, decoding our codes exactly
    (int8 row * scale, or fp16), and a [n, code_size] uint8 view of its codes to fill."""
    import faiss

    dim = self.rows.shape[1]
    if self.dtype == "fp16":
      ix = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
      # QT_8bit_uniform decodes code c as vmin + (c + 0.5) / 255 * vdiff; with c = row + 128
      # these two make it row * scale exactly.
      ix = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_uniform,
                                      faiss.METRIC_INNER_PRODUCT)
      faiss.copy_array_to_vector(np.array([-128.5 * self.scale, 255.0 * self.scale], np.float32),
                                 ix.sq.trained)
    ix.is_trained = True
    ix.codes.resize(n * ix.code_size)
    return ix, faiss.rev_swig_ptr(ix.codes.data(), n * ix.code_size).reshape(n, ix.code_size)

  def _to_codes(self, block: np.ndarray, codes: np.ndarray) -> None:
    """Stored rows -> faiss codes, in place (int8 shifted by 128; fp16 as is)."""
    raw = block.view(np.uint8).reshape(len(block), -1)
    if self.dtype == "fp16":
      codes[:len(block)] = raw
    else:
      np.bitwise_xor(raw, np.uint8(0x80), out=codes[:len(block)])

  @functools.cached_property
  def _faiss(self):
    """A faiss index over the stored rows, or None without faiss-cpu."""
    if not has_faiss():
      return None
    # faiss's code array is sized once and filled in place, block by block: the gallery is never
    # held twice, not even while it is appended. With lazy rows (`load(lazy=True)`) the blocks
    # come from the file, and faiss's codes are the only copy.
    n = len(self)
    ix, codes = self._sq_index(n)
    step = max(1, BLOCK_BYTES // ix.code_size)
    for a in range(0, n, step):
      self._to_codes(np.asarray(self.rows[a:a + step]), codes[a:])
    ix.ntotal = n
    return ix

  @functools.cached_property
  def _stream_buffer(self):
    """For `stream`: a block-sized faiss index whose code array the file is read into (int8
    codes are then shifted by 128 in place), or without faiss a uint8 block buffer."""
    rows = min(self.rows.block_rows, len(self))
    if has_faiss():
      return self._sq_index(rows)
    return None, np.empty((rows, self.rows.shape[1] * self.rows.dtype.itemsize), np.uint8)

  def _search_stream(self, q: np.ndarray, k: int, use_faiss: bool):
    """Top-k over the rows read from disk block by block into one buffer (`stream`): each
    block is scored (by the block-sized faiss index, or numpy), and its top-k merged into the
    running best."""
    ix, buf = self._stream_buffer
    if ix is not None and not use_faiss:  # numpy asked for: a buffer of its own, not faiss's codes.
      ix, buf = None, np.empty_like(buf)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for a in range(0, len(self), len(buf)):
      n = self.rows.read_into(a, buf)
      if ix is not None:
        if self.dtype == "int8":
          np.bitwise_xor(buf[:n], np.uint8(0x80), out=buf[:n])
        ix.ntotal = n
        s, i = ix.search(q, min(k, n))
        i = i.astype(np.int64) + a
      else:
        block = buf[:n].view(self.rows.dtype).astype(np.float32)
        i, s = _top_k((q @ block.T) * np.float32(self.scale), k)
        i += a
      best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
      if best_s.shape[1] > k:
        i, best_s = _top_k(best_s, k)
        best_i = np.take_along_axis(best_i, i, 1)
    return best_i, best_s

  def search(self, query: np.ndarray, k: int = 10, use_faiss: bool = True,
             rerank: Index | None = None, candidates: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by dot product: (indices [Q, k], scores [Q, k]), best first.

    Through faiss when it is installed (and `use_faiss`), else numpy; both score the float
    query against the same dequantized rows. With `rerank` (the same gallery at higher
    precision, e.g. the fp16 file loaded `lazy`), the top `candidates` of this index are
    scored again against its rows and the best k of them returned: int8 speed and memory, the
    ranking of the finer rows (BENCHMARKS.md, "Search at scale").
    """
    q = self._query(query)
    if rerank is not None:
      if rerank.rows.shape != self.rows.shape:
        raise ValueError(f"re-ranking index holds {rerank.rows.shape}, this one {self.rows.shape}")
      cand, _ = self.search(q, max(k, candidates), use_faiss)
      s = np.einsum("qe,qce->qc", q, rerank.rows[cand].astype(np.float32) * rerank.scale)
      order = np.argsort(-s, axis=1, kind="stable")[:, :min(k, len(self))]
      return np.take_along_axis(cand, order, 1), np.take_along_axis(s, order, 1)
    k = min(k, len(self))
    if self.stream:
      return self._search_stream(q, k, use_faiss)
    if use_faiss and self._faiss is not None:
      scores, idx = self._faiss.search(q, k)
      return idx.astype(np.int64), scores
    return _top_k(self.scores(q), k)


def _top_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best of each row of scores s [Q, N]: (indices, scores), best first."""
  k = min(k, s.shape[1])
  top = np.argpartition(-s, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
  idx = np.take_along_axis(top, order, 1)
  return idx, np.take_along_axis(s, idx, 1)
