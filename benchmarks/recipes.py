"""Every distillation recipe on `shapes`, same student, budget and teachers, 3 seeds -> RESULTS.md.

  python -m benchmarks.recipes [--teachers shipped] [--seeds 0 1 2] [--steps N] [--write]

The teachers are the ones shipped in mcad_jax/weights/shapes (`--teachers shipped`, the
default: evaluated once into --out/teachers), or the `teacher` and `fusion_teacher` stages of a
`configs/shapes.py` run in --teachers (this script runs the missing teacher stages itself).
`--set data.source=generate` runs without TensorFlow (a GPU image). Each recipe then trains the demo's student
from those frozen teachers, reading teacher outputs from the cache (the same
losses as online teachers, tested), and is evaluated on the 5k test split.
With --write the table replaces the section between the markers in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

COLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
# Rows: (name, recipe, distill overrides). Every distilling recipe gets the same hard columns
# (each image's canonical caption and its twins, scored by its own teacher); the student
# alone is shown without them and with them as hard negatives (NegCLIP-style).
OUT = "workdirs/recipes"
ROWS = (("student_only", "student_only", {"hard_columns": False}),
        ("student_only+twins", "student_only", {}),
        ("clip_kd", "clip_kd", {}), ("tinyclip", "tinyclip", {}), ("conaclip", "conaclip", {}),
        ("mcad", "mcad", {}))


def run(config, workdir):
  from mcad_jax import config_lib, run, sharding

  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  return run.run_stages(config, workdir, mesh)


def recipe_config(base_arg: str, teachers: str, recipe: str, seed: int, steps: int | None):
  from configs import shapes

  c = shapes.get_config(base_arg)
  c.stages = ("distill",)
  if teachers != "shipped":  # The demo variant starts from the shipped ones.
    c.teacher.weights = os.path.join(teachers, "teacher", "checkpoints")
    c.fusion_teacher.weights = os.path.join(teachers, "fusion_teacher", "checkpoints")
  c.distill.recipe = recipe
  c.distill.cache = True
  c.seed = seed
  if steps:  # A short run keeps a warmup shorter than itself (1500 steps keep the variant's).
    c.distill.steps = steps
    c.distill.optim.warmup_steps = min(c.distill.optim.warmup_steps, max(1, steps // 15))
  c.name = f"recipes:{recipe}:seed{seed}"
  return c


def apply_overrides(dcfg, sets: list[str], root=None) -> str:
  """Applies KEY=VALUE overrides to the distill section `dcfg` (to `root`, the whole config, when
  KEY starts with one of its sections other than distill's, e.g. data.source); returns a
  directory tag for the distill ones."""
  import ast
  import re

  tag = ""
  for item in sets:
    key, _, value = item.partition("=")
    try:
      val = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      val = value
    node = dcfg
    *parents, leaf = key.split(".")
    on_root = root is not None and parents and parents[0] not in dcfg and parents[0] in root
    if on_root:
      node = root
    for k in parents:
      node = node[k]
    node[leaf] = val
    if not on_root:
      tag += "_" + re.sub(r"[^A-Za-z0-9.]+", "-", f"{key}={value}").strip("-")[:40]
  return tag


def is_sweep(config, sets: list[str]) -> bool:
  """Whether `sets` change a distill field of `config`. One that restates the config's own
  value (runs made before that value became the default, say) is not a sweep: its table is
  the default's and may be written to RESULTS.md."""
  trial = copy.deepcopy(config)
  apply_overrides(trial.distill, sets, trial)
  return trial.distill.to_dict() != config.distill.to_dict()


def command_line(args, sweep: bool) -> str:
  """The command that reproduces this table: the rows and --out it ran with, and --write only
  when the table may be written (a sweep's is printed, not written)."""
  flags = [f"--teachers {args.teachers}", "--seeds " + " ".join(map(str, args.seeds))]
  flags += [f"--steps {args.steps}"] if args.steps else []
  flags += ["--recipes " + " ".join(args.recipes)] if args.recipes else []
  flags += [f"--set {x}" for x in args.set]
  flags += [f"--out {args.out}"] if args.out != OUT else []
  flags += [] if sweep else ["--write"]
  return "python -m benchmarks.recipes " + " ".join(flags)


def fmt(xs):
  xs = np.asarray(xs, float)
  return f"{xs.mean():.1f} ± {xs.std(ddof=1):.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--teachers", default="shipped",
                  help="'shipped' (mcad_jax/weights/shapes) or a configs/shapes.py workdir")
  ap.add_argument("--variant", default="demo")
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--recipes", nargs="+", default=None, help=f"rows to run: {[r[0] for r in ROWS]}")
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a distill field for every run, e.g. mcad.alpha=0.3 or "
                       "\"edges=(('si_st','infonce',1.0),)\" (python literal); runs go to "
                       "--out/<recipe>_<overrides>_seed<N> and are not written to RESULTS.md "
                       "unless every value is the config's own")
  ap.add_argument("--collect", action="store_true",
                  help="train nothing: tabulate the runs that already finished in --out")
  args = ap.parse_args()

  from configs import shapes
  from mcad_jax import main as mcad_main

  mcad_main.setup_logging()
  t0 = time.time()
  base = shapes.get_config(args.variant)
  base.stages = ("teacher", "fusion_teacher")
  sweep = is_sweep(base, args.set)
  apply_overrides(base.distill, args.set, base)
  # Skips what is already finished; the shipped teachers are only evaluated.
  teachers = run(base, os.path.join(args.out, "teachers") if args.teachers == "shipped" else args.teachers)
  rows: dict[str, list[dict]] = {}
  for name, recipe, fixed in ROWS:
    if args.recipes and name not in args.recipes:
      continue
    for seed in args.seeds:
      cfg = recipe_config(args.variant, args.teachers, recipe, seed, args.steps)
      cfg.distill.update(fixed)
      tag = apply_overrides(cfg.distill, args.set, cfg)
      out = os.path.join(args.out, f"{name}{tag}_seed{seed}")
      if args.collect and not os.path.exists(os.path.join(out, "distill", "done.json")):
        continue
      res = run(cfg, out)
      rows.setdefault(name, []).append(
          {**res["retrieval"]["student"], **res["hard_negatives"].get("student", {}),
           "seconds": res["stages"]["distill"]["seconds"]})
      print(name, seed, json.dumps(rows[name][-1]), flush=True)
  minutes = (time.time() - t0) / 60
  # The students' own training time, read from their runs (so also right for --collect).
  train_min = sum(r["seconds"] for rs in rows.values() for r in rs) / 60

  steps = args.steps or base.distill.steps
  import jax

  lines = [f"`{command_line(args, sweep)}`: student `{base.distill.model.image}` + "
           f"`{base.distill.model.text}` text, "
           f"{steps} steps at batch {base.distill.batch_size}, teacher outputs from the cache; "
           f"mean ± std over each row's n seeds; the students trained for {train_min:.0f} "
           f"min in all on {jax.devices()[0].device_kind}"
           f"{'' if args.collect else f' ({minutes:.0f} min for this command)'}.",
           "",
           "| model | " + " | ".join(COLS) + " | hn relation | hn colour |",
           "|---" * (len(COLS) + 3) + "|"]
  for name, key in (("teacher", "teacher"), ("fusion_teacher", "fusion_teacher")):
    r = teachers["retrieval"][key]
    hn = teachers["hard_negatives"].get(key, {})
    nan = float("nan")
    lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in COLS)
                 + f" | {hn.get('hn_relation', nan):.1f} | {hn.get('hn_attribute', nan):.1f} |")
  for recipe, rs in rows.items():
    lines.append(f"| student: {recipe} (n={len(rs)}) | " + " | ".join(fmt([r[c] for r in rs]) for c in COLS)
                 + f" | {fmt([r.get('hn_relation', np.nan) for r in rs])}"
                 f" | {fmt([r.get('hn_attribute', np.nan) for r in rs])} |")
  print("\n".join(lines))
  if args.write and sweep:
    print("recipes.py: not written to RESULTS.md: a --set changes a distill field of the "
          "config, so this table is a sweep's; its command is in the header above.", file=sys.stderr)
  elif args.write:
    from benchmarks.report import write_section

    write_section("RESULTS.md", "recipes", "Recipes on `shapes`", lines)


if __name__ == "__main__":
  main()
