"""Runs a config's stages in order: the stage list, its dispatch by kind, results.json.

The orchestration above the library: the train loop (`train.py`) knows nothing of the
exporter, and this module is the one place that reaches the top-level `export` package (for
the export stage, which needs TensorFlow). The entry points (`main.py`, `export/__main__.py`,
the benchmarks) call `run_stages`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

import jax

from mcad_jax import fileio, provenance, train

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
  """A stage that cannot produce a usable result (e.g. an export failing its checks)."""

  def __init__(self, stage: str, msg: str):
    super().__init__(f"stage {stage!r} failed: {msg}")


def export_stage(config, name: str, workdir: str, mesh=None) -> dict:
  """The export stage (TensorFlow-based, in the top-level `export` package), skipped once done."""
  del mesh  # The export runs on the host.
  stage_dir = os.path.join(workdir, name)
  done = train.read_done(stage_dir)
  if done is not None:
    log.info("Stage %s already finished; skipping.", name)
    return done
  if jax.process_index() != 0:  # One process writes the files; the others have nothing to do.
    return {"seconds": 0.0, "steps": 0, "retrieval": {}}
  # Needs TensorFlow: pip install -e '.[export,onnx]'.
  from export import convert as export_convert, stage as export_lib

  try:
    record = export_lib.run_export(config, workdir, name)
  except export_convert.ExportError as e:
    raise StageFailed(name, str(e)) from e
  train.write_json(os.path.join(stage_dir, train.DONE_FILE), record)
  return record


def _prepare(config, name: str, workdir: str, action: str) -> None:
  """Applies `provenance.plan`'s action to the stage's directory and records its config."""
  stage_dir = os.path.join(workdir, name)
  if jax.process_index() == 0:
    if action == provenance.REDO:
      log.info("Stage %s: its config or a stage it reads changed; training it again.", name)
      shutil.rmtree(stage_dir, ignore_errors=True)
    elif action == provenance.CONTINUE:
      log.info("Stage %s: steps raised to %d; continuing from its last checkpoint.", name,
               config[name].steps)
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(stage_dir, train.DONE_FILE))
  if jax.process_count() > 1:  # No process may read done.json before process 0 acts on it.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"prepare {name}")
  # A stage finished before stages recorded their config keeps no record: one now would be a guess.
  if action != provenance.KEEP and train.read_done(stage_dir) is None and jax.process_index() == 0:
    os.makedirs(stage_dir, exist_ok=True)
    fileio.write_json(os.path.join(stage_dir, provenance.CONFIG_FILE),
                      provenance.record(config, name))


def run_stages(config, workdir: str, mesh, actions: dict[str, str] | None = None) -> dict:
  """Runs every configured stage in order; returns the results.json dict.

  Args:
    actions: `provenance.plan`'s verdict per stage (default: none checked; every stage new).
  """
  results = {"config": config.name, "stages": {}, "retrieval": {}, "hard_negatives": {}}
  for name in config.stages:
    _prepare(config, name, workdir, (actions or {}).get(name, provenance.NEW))
    rec = KINDS[config[name].kind](config, name, workdir, mesh)
    results["stages"][name] = {"seconds": rec["seconds"], "steps": rec["steps"]}
    if "export" in rec:
      results["export"] = rec["export"]
    for row, metrics_ in rec["retrieval"].items():
      ret = dict(metrics_)
      hn = {k: ret.pop(k) for k in list(ret) if k.startswith("hn_")}
      results["retrieval"][row] = ret
      if hn:
        results["hard_negatives"][row] = hn
    train.write_json(os.path.join(workdir, "results.json"), results)  # A later failure loses nothing.
  return results


def format_table(results: dict) -> str:
  """The retrieval table printed at the end of a run."""
  cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
  head = f"{'model':<16}" + "".join(f"{c:>9}" for c in cols) + f"{'hn_rel':>8}{'hn_attr':>8}"
  lines = [head, "-" * len(head)]
  for model, row in results["retrieval"].items():
    hn = results.get("hard_negatives", {}).get(model, {})
    lines.append(f"{model:<16}" + "".join(f"{row[c]:>9.1f}" for c in cols)
                 + "".join(f"{hn[k]:>8.1f}" if k in hn else f"{'-':>8}"
                           for k in ("hn_relation", "hn_attribute")))
  return "\n".join(lines)


# Stage kind -> (config, name, workdir, mesh) -> the stage record.
KINDS = {"dual": train.train_stage, "fusion": train.train_stage, "distill": train.train_stage,
         "export": export_stage}
