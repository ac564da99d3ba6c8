"""Atomic file writes: every file the project writes appears whole or not at all.

A writer fills a temporary file next to the target (same directory, so the
same filesystem), flushes it to disk and renames it over the target. A crash,
a kill or a full disk at any point leaves the previous version of the file (or
none) and at worst a `*.tmp<pid>` file, never half a file. TensorFlow-free, so
`mcad_jax` and `export` share it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path to write; on success renames it to `path`.

  For writers that take a path (`onnx.save`, `PIL.Image.save`, `np.save`). On
  an exception the temporary file is removed and `path` is left as it was.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes `data` (bytes, or str as UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)


def read_json(path: str):
  """The JSON object at `path`, or None where there is no file (a file is whole or absent)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  """`obj` as JSON at `path`, atomically."""
  atomic_write(path, json.dumps(obj, indent=indent))
