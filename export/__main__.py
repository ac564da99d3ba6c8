"""Export stage on any workdir: `python -m export --workdir W [options]`.

Reads the run's `W/config.json`, exports the student of `--source` (default: the
config's export section, else `distill`), verifies it, and merges the `export`
section and `student_<format>` rows into `W/results.json`. Re-running redoes the
export (unlike the pipeline, which skips a finished stage), replacing files as it writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def load_run_config(workdir: str):
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a mcad_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--source", help="stage whose student to export (dual or distill)")
  ap.add_argument("--formats", nargs="+", help="TFLite formats: fp32 fp16 dynamic int8 npu "
                  "npu_per_tensor (export/stage.py, FORMATS)")
  ap.add_argument("--reeval", nargs="*", help="formats to re-run the retrieval eval with")
  ap.add_argument("--int8-io", action="store_true", help="uint8 image in, int8 embedding out")
  ap.add_argument("--no-onnx", action="store_true")
  ap.add_argument("--int8-recipe", help="how int8 files are made: dynamic_w8 (default), tf (static "
                  "full-integer, for NPUs), a8w8, a16w8 (export/quantize.py)")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="[export] %(message)s")

  from mcad_jax import checkpoint, config_lib, fileio, run, train, workdir_lock
  from mcad_jax.data import pipeline

  workdir = os.path.abspath(args.workdir)
  try:
    config = load_run_config(workdir)
    if "export" not in config or config.export.get("kind") != "export":
      config.export = config_lib.export_stage_config(args.source or "distill")
    else:  # A workdir from an older version lacks the newer keys: take their defaults.
      config.export = config_lib.export_stage_config(**config.export.to_dict())
    e = config.export
    if args.int8_recipe:
      e.int8_recipe = args.int8_recipe
    if args.source:
      e.source = args.source
    if args.formats:
      e.formats = tuple(args.formats)
      e.reeval = tuple(f for f in e.reeval if f in e.formats or f == "onnx")
      if e.index_encoder not in e.formats:
        e.index_encoder = e.formats[-1]
    if args.reeval is not None:
      e.reeval = tuple(args.reeval)
    e.int8_io = e.int8_io or args.int8_io
    e.onnx = e.onnx and not args.no_onnx
    config.stages = tuple(s for s in config.stages if s != "export") + ("export",)
    config_lib.validate(config)
    lock = workdir_lock.WorkdirLock(workdir)  # Not beside a running pipeline on the same workdir.
    lock.acquire()
  except (FileNotFoundError, config_lib.ConfigError, workdir_lock.WorkdirBusy) as err:
    print(f"export: {err}", file=sys.stderr)
    return 2
  # Forget only that the stage finished: files are overwritten one by one (atomically), so a
  # failing re-export leaves the previous good files in place.
  done = os.path.join(workdir, "export", train.DONE_FILE)
  if os.path.exists(done):
    os.remove(done)
  try:
    rec = run.export_stage(config, "export", workdir)
  except (run.StageFailed, OSError, checkpoint.CheckpointError, pipeline.DataFault) as err:
    print(f"export: {err}", file=sys.stderr)
    return 1
  path = os.path.join(workdir, "results.json")
  results = fileio.read_json(path) or {"config": config.name}
  results.setdefault("stages", {})["export"] = {"seconds": rec["seconds"], "steps": 0}
  results.setdefault("retrieval", {}).update(rec["retrieval"])
  results["export"] = rec["export"]
  fileio.write_json(path, results)
  print(open(os.path.join(workdir, "export", "report.md")).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
