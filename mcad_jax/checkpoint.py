"""Orbax checkpoints: async, keep the newest N, resume, fall back past a corrupt one.

A checkpoint holds two items: `state` ({params, opt, step}, restored straight
into its sharded layout) and `data` (the grain iterator state plus bookkeeping,
as JSON). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves no half checkpoint in the listing. A
checkpoint that is listed but cannot be read is moved aside (renamed, never
deleted) and the previous one is used, with a warning.

Failures are named, not tracebacks: a save that fails (disk full, permission,
quota) raises `CheckpointSaveError` naming the directory, the step and the
cause, as soon as it is known (saves run in the background: `poll()` each
step, and every later save or `close()` checks too); the checkpoints before it
stay as they were. Weights that do not fit the model raise `CheckpointError`
listing the parameters that differ.
"""

from __future__ import annotations

import logging
import os
import re
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: none there, or one of another model."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint save that failed (disk full, permission, quota...)."""

  def __init__(self, directory: str, step: int | None, cause: str, intact: list[int]):
    at = f"step {step}" if step is not None else "a checkpoint"
    keep = (f"checkpoints {intact} are intact, the run resumes from step {intact[-1]}" if intact
            else "no earlier checkpoint, the run starts over")
    super().__init__(f"could not save {at} in {directory}: {cause}; stopping. Free space or fix "
                     f"the directory, then rerun the same command ({keep}).")
    self.step = step


def _cause(e: BaseException) -> str:
  """The short reason inside an orbax / tensorstore / OS error."""
  for x in (e, e.__cause__, e.__context__):
    if isinstance(x, OSError) and x.strerror:
      return x.strerror
  msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
  m = re.search(r"([^:]+?)\s*\[os_error_code='?(\d+)'?\]", msg)  # tensorstore's OS errors.
  if m:
    return f"{m.group(1).strip()} (errno {m.group(2)})"
  return msg[:300]


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
    self._pending: int | None = None  # Step of a save that may still run in the background.

  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    """Starts saving `step` (in the background); raises CheckpointSaveError on a failure."""
    self._finish_pending()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds.
      raise self._save_error(step, e) from e
    self._pending = step

  def poll(self) -> None:
    """Raises CheckpointSaveError if a background save has failed; never waits."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e

  def _save_error(self, step, e: BaseException) -> CheckpointSaveError:
    log.debug("Checkpoint save of step %s failed", step, exc_info=e)
    try:
      intact = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      intact = []
    return CheckpointSaveError(self.directory, step, _cause(e), intact)

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
    self._finish_pending()

  def close(self, check: bool = True) -> None:
    """Waits for a pending save, then closes.

    Args:
      check: raise CheckpointSaveError if that save failed; False when the run is
        already failing, so its first error is the one reported (this one is logged).
    """
    try:
      self._finish_pending()
    except CheckpointSaveError as e:
      if check:
        raise
      log.warning("%s", e)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001 - a failed save can leave the manager unclosable.
        if check:
          raise self._save_error(None, e) from e


def load_params(directory: str, abstract_params):
  """Params of the newest checkpoint in `directory` (e.g. a finished teacher stage).

  Reads only the params (not the optimizer state), straight into the layout of
  `abstract_params` (sharded `jax.ShapeDtypeStruct`s). Under each top-level key
  of `abstract_params` the checkpoint must hold the same parameters with the
  same shapes; other top-level keys (a distillation stage's heads) are skipped.

  Raises:
    CheckpointError: no checkpoint there, or one of another model (the
      parameters that differ are listed).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory}")
  ckpt = Checkpointer(directory, async_save=False)
  steps = ckpt.steps()
  ckpt.close()
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory}")
  path = os.path.join(ckpt.directory, str(steps[-1]), "state")
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # Orbax warns that the step-level metadata file is not here.
  try:
    return _restore_params(path, abstract_params)
  finally:
    absl_log.setLevel(level)


def _restore_params(path: str, abstract_params):
  from mcad_jax import convert, sharding

  item = {"params": abstract_params}
  with ocp.PyTreeCheckpointer() as pc:
    tree = pc.metadata(path).item_metadata.tree
    stored = tree.get("params", {}) if isinstance(tree, dict) else {}
    stored = {k: v for k, v in stored.items() if k in abstract_params}

    def flat(t):
      leaves = jax.tree_util.tree_flatten_with_path(t)[0]
      return {sharding.path_str(p): tuple(x.shape) for p, x in leaves}

    why = convert.fit_problems(flat(abstract_params), flat(stored))
    if why:
      raise CheckpointError(f"the checkpoint in {path} is of another model: {why}. Point it at "
                            "a checkpoint of this stage's model, or change the model config to "
                            "match it")
    out = pc.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return out["params"]
