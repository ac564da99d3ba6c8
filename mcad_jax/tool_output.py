"""Sending libraries' own output, written below Python's logging, to a file.

TensorFlow's C++ start-up lines (TFDS imports it to prepare a dataset), the TFLite converter,
ai-edge-quantizer's progress bars and LiteRT's "Created XNNPACK delegate" banner write straight
to file descriptors 1 and 2, where `logging` cannot filter them. A user of `make demo` should
read our progress lines and the table, and find the tools' output in the workdir. TensorFlow-free,
so `mcad_jax` and `export` share it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def tool_output_to(path: str | None):
  """Sends whatever is written to file descriptors 1 and 2 meanwhile to `path` (appended);
  with `path` None, changes nothing."""
  if path is None:
    yield
    return
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  try:
    with open(path, "ab") as f:
      os.dup2(f.fileno(), 1)
      os.dup2(f.fileno(), 2)
      try:
        yield
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
  finally:
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def run_log_file() -> str | None:
  """The run's log file (`W/mcad_jax.log`: the file handler `main.setup_logging` gives our
  logger; the newest if several), or None when there is none (a library caller, a test)."""
  for h in reversed(logging.getLogger("mcad_jax").handlers):
    if isinstance(h, logging.FileHandler):
      return h.baseFilename
  return None
