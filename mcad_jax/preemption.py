"""Preemption: notice SIGTERM (or JAX's preemption sync point) and stop at a step boundary.

The train loop asks `should_stop(step)` after every step. When it says yes, the
loop saves a checkpoint of that step and raises `Preempted`; `main` exits with
code 143 (128 + SIGTERM) and the same command resumes from that step.

- One process: a SIGTERM handler sets a flag, read at the next step boundary.
- Several processes (a TPU pod): hosts may get SIGTERM at different steps, and a
  checkpoint save is collective, so they must agree on the step. JAX's
  preemption sync manager, started by `jax.distributed.initialize`, does that:
  `multihost_utils.reached_preemption_sync_point(step)` is true on every host
  at the same step. No Python handler is installed then (it is JAX's signal).
"""

from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
  """The run stopped early on a preemption notice, after saving `step`."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved a checkpoint at step {step} and stopped. Run the same "
                     f"command again to resume.")
    self.step = step


class Watcher:
  """Answers "should the loop stop after this step?"."""

  def __init__(self):
    self.flag = False
    self.multi = jax.process_count() > 1
    self._old = None
    if not self.multi:
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    del signum, frame
    if not self.flag:
      log.warning("SIGTERM: will save a checkpoint and stop after the current step.")
    self.flag = True

  def should_stop(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils

      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # No preemption service (e.g. CPU processes without one).
        return False
    return self.flag

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None
