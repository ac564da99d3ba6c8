"""Run logging: a JSON-lines metrics file, TensorBoard scalars, a progress line with throughput and ETA.

Only process 0 writes; other processes get a writer that drops everything, so
call sites need no `if process_index() == 0`. TensorBoard event files come from
`tensorboardX`, which needs neither TensorFlow nor the tensorboard package.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from mcad_jax import fileio


class NonFiniteLossError(RuntimeError):
  """Raised when the training loss becomes NaN or inf; names the step."""

  def __init__(self, step: int, value: float):
    super().__init__(f"training loss is {value} at step {step}; stopping. The last good "
                     f"checkpoint is kept (bad state is never saved).")
    self.step = step


def check_finite(step: int, loss: float) -> None:
  if not math.isfinite(loss):
    raise NonFiniteLossError(step, loss)


def _fmt_duration(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class MetricWriter:
  """Appends one JSON object per call to `path`, and its scalars to TensorBoard (process 0 only).

  After a resume, TensorBoard shows the replayed steps again (its files are
  append-only); metrics.jsonl is the record without duplicates.
  """

  def __init__(self, path: str, tensorboard_dir: str | None = None):
    self.enabled = jax.process_index() == 0
    self.path = path
    self.tb = None
    if self.enabled:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if tensorboard_dir:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(tensorboard_dir)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites them, so none appear twice."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    fileio.atomic_write(self.path, "".join(keep))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    rec = {k: _jsonable(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self.tb is not None and "step" in rec:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, float(v), int(rec["step"]))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _jsonable(v):
  try:
    return v.item() if hasattr(v, "item") else v
  except (TypeError, ValueError):
    return float(v)


class Progress:
  """Throughput and ETA over the steps run in this process (not counting restored ones)."""

  def __init__(self, name: str, total_steps: int, first_step: int, batch_size: int):
    self.name, self.total, self.batch = name, total_steps, batch_size
    self.t0, self.s0 = time.time(), first_step
    self.last_t, self.last_s = self.t0, first_step

  def examples_per_sec(self, step: int) -> float:
    now = time.time()
    rate = (step - self.last_s) * self.batch / max(now - self.last_t, 1e-9)
    self.last_t, self.last_s = now, step
    return rate

  def line(self, step: int, loss: float, rate: float) -> str:
    done = step - self.s0
    eta = (time.time() - self.t0) / done * (self.total - step) if done > 0 else float("nan")
    eta_s = _fmt_duration(eta) if math.isfinite(eta) else "?"
    return (f"[{self.name}] step {step}/{self.total} ({100.0 * step / self.total:5.1f}%) "
            f"loss {loss:.4f} | {rate:,.0f} ex/s | ETA {eta_s}")

  def show(self, text: str) -> None:
    if jax.process_index() == 0:
      print(text, file=sys.stderr, flush=True)
