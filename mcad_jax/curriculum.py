"""A curriculum over scene complexity: which training examples and twins count, by step.

ShapeWorld's FiLM "is not able to learn relational statements straight away
except for very simple instances"; pretraining on simpler ones helped (Kuhnle,
Xie and Copestake 2018). Our `shapes` data is fixed on disk, so instead of
regenerating it, the curriculum weights what is already in each batch: up to
step `until`, only scenes with at most `max_objects` objects count, and only the
named twin kinds are negatives.

A schedule is a tuple of phases `(until_step, max_objects, twins)`, with `twins`
a comma-separated subset of 'relation,attribute'. After the last phase every
example and both twin kinds count. The empty schedule is no curriculum.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TWIN_KINDS = ("relation", "attribute")
ALL_OBJECTS = 1_000_000


def validate(schedule) -> None:
  """Raises ValueError naming the bad phase."""
  last = -1
  for i, phase in enumerate(schedule):
    if len(phase) != 3:
      raise ValueError(f"phase {i} must be (until_step, max_objects, twins), got {phase!r}")
    until, max_objects, twins = phase
    if int(until) <= last:
      raise ValueError(f"phase {i}: until_step {until} must grow (previous {last})")
    if int(max_objects) < 1:
      raise ValueError(f"phase {i}: max_objects must be >= 1, got {max_objects}")
    bad = [t for t in str(twins).split(",") if t and t not in TWIN_KINDS]
    if bad:
      raise ValueError(f"phase {i}: unknown twin kinds {bad}; known {TWIN_KINDS}")
    last = int(until)


def phase_table(schedule) -> dict[str, np.ndarray]:
  """The schedule as arrays, with a final phase where everything counts."""
  untils = np.array([int(p[0]) for p in schedule], np.int32)
  max_obj = np.array([int(p[1]) for p in schedule] + [ALL_OBJECTS], np.int32)
  twins = [str(p[2]).split(",") for p in schedule] + [list(TWIN_KINDS)]
  table = {"until": untils, "max_objects": max_obj}
  for kind in TWIN_KINDS:
    table[kind] = np.array([kind in t for t in twins], np.float32)
  return table


def at_step(schedule, step) -> dict[str, jnp.ndarray]:
  """{'max_objects', 'relation', 'attribute'} in force at `step` (traceable)."""
  t = phase_table(schedule)
  phase = jnp.sum(jnp.asarray(step) >= jnp.asarray(t["until"]))
  return {k: jnp.asarray(v)[phase] for k, v in t.items() if k != "until"}
