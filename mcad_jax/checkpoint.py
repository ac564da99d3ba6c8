"""Orbax checkpoints: async, keep the newest N, resume, fall back past a corrupt one.

A checkpoint holds two items: `state` ({params, opt, step}, restored straight
into its sharded layout) and `data` (the grain iterator state plus bookkeeping,
as JSON). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves no half checkpoint in the listing. A
checkpoint that is listed but cannot be read is moved aside (renamed, never
deleted) and the previous one is used, with a warning.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for train states.

  Args:
    directory: where step directories go.
    keep: how many of the newest checkpoints to keep.
    async_save: save in a background thread.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state):
    """Returns (step, state, data_state) of the newest readable checkpoint, or None.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings.
    """
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], out["data"]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike.
        log.warning("Checkpoint at step %d in %s is unreadable (%s: %s); moving it aside "
                        "and falling back to the previous one.", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        os.rename(src, os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mcad_jax:set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(directory: str, abstract_params):
  """Params of the newest checkpoint in `directory` (e.g. a finished teacher stage).

  Reads only the params (not the optimizer state), straight into the layout of
  `abstract_params` (sharded `jax.ShapeDtypeStruct`s).
  """
  ckpt = Checkpointer(directory, async_save=False)
  steps = ckpt.steps()
  ckpt.close()
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  item = {"params": abstract_params}
  path = os.path.join(ckpt.directory, str(steps[-1]), "state")
  with ocp.PyTreeCheckpointer() as pc:
    out = pc.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return out["params"]
