"""MCAD's binding result measured as a reviewer would: settings chosen on val, reported on test.

  python -m benchmarks.protocol run [--workers 2 --worker I] [--out DIR]   # the queue (resumable)
  python -m benchmarks.protocol table [--out DIR] [--write]                # what has finished

The protocol, in the order the queue runs it:

1. **Selection on val.** Every recipe gets the same grid, the same budget (the demo's student,
   1500 steps at 2e-3, teacher outputs from the cache) and one seed per setting, evaluated on
   the `validation` split (5k scenes, its own generator stream): `hard_weight` in {0, 1, 3} x
   `hard_label_weight` in {0, 2}, and for MCAD also `mcad.alpha` in {0, 0.1, 0.3}. The student
   alone with twins gets its only knob, the twins' weight, in {1, 2, 3}. Each recipe keeps the
   setting with the best val score, `--criterion` (default: RSUM + hn relation + hn colour, all
   in %, fixed before any run). Runs from both dual teachers: the shipped one (plain InfoNCE) and
   `negclip` (trained with the twins as hard negatives, `configs/shapes.py:teachers_negclip`).
2. **Test at 5 seeds** for each recipe's selected setting from each dual teacher, and MCAD's
   ablation ladder at its selected setting (3 seeds): alpha=0 (the hard columns' ITM only),
   `mcad.hard_itm_weight=0` (the fused features only), `mcad.proj=fixed` (teacher side frozen),
   `hard_columns=False`.
3. **The table**: the selection table (val) and the test table, with each recipe's difference
   from MCAD paired by seed and its 95% t-interval; "beats" only where it excludes 0.

Every run is a `configs/shapes.py` distill stage in its own workdir under --out; a stopped queue
resumes (finished runs are skipped, a cut-off run resumes from its checkpoint). With
`--workers N --worker I`, N processes split each phase's runs; the test phase starts once every
val run has finished (a worker waits for the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

from benchmarks import recipes
from mcad_jax import fileio

OUT = "workdirs/protocol"
STEPS = 1500
TEST_SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = (0, 1, 2)
CRITERIA = ("rsum+hn", "rsum", "hn")
# The dual teachers: 'shipped' (mcad_jax/weights/shapes, plain InfoNCE) and 'negclip' (the same
# budget with the twins as hard negatives), a shipped set or a `teachers_negclip` workdir.
DUALS = ("shipped", "negclip")
NEGCLIP_SET = "shapes_negclip"

# Recipe rows, (row, recipe, fixed distill settings): recipes.py's.
ROWS = recipes.ROWS
# Rows whose loss reads no dual teacher run once, not once per dual teacher.
TEACHERLESS = ("student_only", "student_only+twins")
# MCAD's ablation ladder, on top of its selected setting.
ABLATIONS = (("alpha=0 (hard-column ITM only)", {"mcad.alpha": 0.0}),
             ("fused features only (no hard-column ITM)", {"mcad.hard_itm_weight": 0.0}),
             ("teacher side frozen (fixed projections)", {"mcad.proj": "fixed"}),
             ("no hard columns", {"hard_columns": False}))


def grid(row: str) -> list[dict]:
  """The settings every recipe is searched over on val (one seed each)."""
  if row == "student_only":
    return [{}]
  if row == "student_only+twins":  # Its twins' weight is its only knob (hard_label_weight).
    return [{"hard_label_weight": w} for w in (1.0, 2.0, 3.0)]
  base = [{"hard_weight": hw, "hard_label_weight": lw} for hw in (0.0, 1.0, 3.0) for lw in (0.0, 2.0)]
  if row == "mcad":
    return [{**b, "mcad.alpha": a} for a in (0.0, 0.1, 0.3) for b in base]
  return base


@dataclasses.dataclass(frozen=True)
class Run:
  phase: str       # 'val' | 'test'
  dual: str        # which dual teacher
  row: str
  setting: tuple   # sorted (key, value) distill overrides
  seed: int
  label: str = ""  # ablation name, '' for a recipe row

  def tag(self) -> str:
    parts = [f"{k}={v}" for k, v in self.setting]
    return "_".join(p.replace("mcad.", "") for p in parts) or "default"

  def workdir(self, out: str) -> str:
    dual = "none" if self.row in TEACHERLESS else self.dual
    return os.path.join(out, self.phase, dual, self.row, f"{self.tag()}_seed{self.seed}")


def _setting(d: dict) -> tuple:
  return tuple(sorted(d.items()))


# The queue's order: the comparison that matters first (MCAD against CLIP-KD from either dual
# teacher), then the student alone, then the other recipes.
PRIORITY = (("shipped", "mcad"), ("shipped", "clip_kd"), ("negclip", "clip_kd"),
            ("shipped", "student_only+twins"), ("shipped", "student_only"), ("negclip", "mcad"),
            ("shipped", "conaclip"), ("negclip", "conaclip"), ("shipped", "tinyclip"),
            ("negclip", "tinyclip"))


def val_runs(duals=DUALS) -> list[Run]:
  runs = []
  for dual, row in PRIORITY:
    if dual in duals or (row in TEACHERLESS and dual == "shipped"):
      dual = duals[0] if row in TEACHERLESS else dual
      runs += [Run("val", dual, row, _setting(s), 0) for s in grid(row)]
  return runs


def negclip_weights(out: str) -> str:
  """The NegCLIP dual teacher: the shipped set if present, else the queue's own training run."""
  from mcad_jax import shipped

  p = shipped.path(NEGCLIP_SET, "teacher")
  return p if os.path.isdir(p) else os.path.join(out, "teachers_negclip", "teacher", "checkpoints")


def negclip_ready(out: str) -> bool:
  from mcad_jax import shipped

  return (os.path.isdir(shipped.path(NEGCLIP_SET, "teacher"))
          or os.path.exists(os.path.join(out, "teachers_negclip", "teacher", "done.json")))


def config_for(run: Run, out: str, steps: int = STEPS, source: str = "tfds"):
  recipe, fixed = next((r, f) for n, r, f in ROWS if n == run.row)
  c = recipes.recipe_config("demo", "shipped", recipe, run.seed, steps)
  if run.dual == "negclip":  # Only the dual teacher changes; the fusion teacher stays shipped.
    c.teacher.weights = negclip_weights(out)
  c.data.source = source  # 'generate': no TensorFlow (a GPU image); the same examples.
  c.distill.update(fixed)
  for key, val in run.setting:
    node = c.distill
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = val
  if run.phase == "val":
    c.data.test_split = "validation"
  c.name = f"protocol:{run.phase}:{run.dual}:{run.row}:{run.tag()}:seed{run.seed}"
  return c


def result(run: Run, out: str) -> dict | None:
  """The run's student row (retrieval and hard negatives), or None if it has not finished."""
  done = fileio.read_json(os.path.join(run.workdir(out), "distill", "done.json"))
  return done["retrieval"]["student"] if done else None


def score(rec: dict, criterion: str) -> float:
  hn = rec.get("hn_relation", 0.0) + rec.get("hn_attribute", 0.0)
  return {"rsum+hn": rec["rsum"] + hn, "rsum": rec["rsum"], "hn": hn}[criterion]


def selected(out: str, criterion: str, duals=DUALS) -> dict[tuple[str, str], Run]:
  """(dual, row) -> the val run with the best score, for rows whose whole grid has finished."""
  best: dict[tuple[str, str], Run] = {}
  by_key: dict[tuple[str, str], list[Run]] = {}
  for r in val_runs(duals):
    by_key.setdefault((r.dual, r.row), []).append(r)
  for key, runs in by_key.items():
    recs = [result(r, out) for r in runs]
    if all(x is not None for x in recs):
      best[key] = max(zip(runs, recs, strict=True), key=lambda rr: score(rr[1], criterion))[0]
  return best


def test_runs(out: str, criterion: str, duals=DUALS) -> list[Run]:
  runs = []
  for (dual, row), r in selected(out, criterion, duals).items():
    runs += [Run("test", dual, row, r.setting, s) for s in TEST_SEEDS]
    if row == "mcad":
      for label, extra in ABLATIONS:
        setting = _setting({**dict(r.setting), **extra})
        runs += [Run("test", dual, row, setting, s, label) for s in ABLATION_SEEDS]
  return list(dict.fromkeys(runs))  # An ablation equal to the selection is not run twice.


def _mine(runs: list[Run], worker: int, workers: int) -> list[Run]:
  return [r for i, r in enumerate(runs) if i % workers == worker]


def _drain(runs: list[Run], args) -> None:
  """Runs this worker's share of `runs` that have not finished (NegCLIP ones once its teacher is)."""
  for r in _mine(runs, args.worker, args.workers):
    if result(r, args.out) is None and (r.dual != "negclip" or negclip_ready(args.out)):
      t0 = time.time()
      recipes.run(config_for(r, args.out, args.steps, args.data_source), r.workdir(args.out))
      print(f"protocol: {r.workdir(args.out)} done in {(time.time() - t0) / 60:.1f} min", flush=True)


def cmd_run(args) -> None:
  from configs import shapes
  from mcad_jax import main as mcad_main

  mcad_main.setup_logging()
  duals = tuple(args.duals)
  if "negclip" in duals and args.worker == 1 % args.workers and not negclip_ready(args.out):
    # One worker trains the NegCLIP teacher while the others start on the shipped one's runs.
    recipes.run(shapes.get_config("teachers_negclip"), os.path.join(args.out, "teachers_negclip"))
  val = val_runs(duals)
  while any(result(r, args.out) is None for r in val):
    _drain(val, args)
    waiting = [r for r in val if result(r, args.out) is None]
    if waiting:
      print(f"protocol: worker {args.worker} waits for {len(waiting)} val runs", flush=True)
      time.sleep(60)
  _drain(test_runs(args.out, args.criterion, duals), args)


# ----------------------------------------------------------------------------- tables

COLS = ("rsum", "hn_relation", "hn_attribute")


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
  """Mean of a - b paired by seed, and its 95% t-interval."""
  from scipy import stats

  d = np.asarray(a, float) - np.asarray(b, float)
  if len(d) < 2:
    return float(d.mean()), math.nan, math.nan
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def selection_table(out: str, criterion: str, duals=DUALS) -> list[str]:
  best = selected(out, criterion, duals)
  lines = ["| dual teacher | recipe | setting | RSUM | hn relation | hn colour | score | chosen |",
           "|---|---|---|---|---|---|---|---|"]
  for r in val_runs(duals):
    rec = result(r, out)
    if rec is None:
      lines.append(f"| {r.dual} | {r.row} | {r.tag()} | (not run yet) | | | | |")
      continue
    chosen = "**yes**" if best.get((r.dual, r.row)) == r else ""
    lines.append(f"| {'-' if r.row in TEACHERLESS else r.dual} | {r.row} | {r.tag()} | "
                 f"{rec['rsum']:.1f} | {rec.get('hn_relation', math.nan):.1f} | "
                 f"{rec.get('hn_attribute', math.nan):.1f} | {score(rec, criterion):.1f} | {chosen} |")
  return lines


def test_table(out: str, criterion: str, duals=DUALS) -> list[str]:
  """Each selected row (and ablation) at its seeds, with its paired difference from MCAD."""
  groups: dict[tuple, dict[int, dict]] = {}
  for r in test_runs(out, criterion, duals):
    rec = result(r, out)
    if rec is not None:
      groups.setdefault((r.dual, r.row, r.label, r.setting), {})[r.seed] = rec
  ref = {d: next((v for (dd, row, lab, _), v in groups.items() if dd == d and row == "mcad"
                  and not lab), None) for d in duals}
  lines = ["| dual teacher | row | setting (val-selected) | n | RSUM | hn relation | hn colour | "
           "MCAD - row, RSUM [95% CI] | relation [95% CI] | colour [95% CI] |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for (dual, row, label, setting), recs in groups.items():
    seeds = sorted(recs)
    name = f"{row}: {label}" if label else row
    diffs = []
    mref = ref.get(dual if row not in TEACHERLESS else duals[0])
    for c in COLS:
      common = [s for s in seeds if mref and s in mref]
      if mref is None or (row == "mcad" and not label) or len(common) < 2:
        diffs.append("")
        continue
      m, lo, hi = paired_ci([mref[s][c] for s in common], [recs[s][c] for s in common])
      diffs.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if lo > 0 or hi < 0 else ""))
    tag = "_".join(f"{k.replace('mcad.', '')}={v}" for k, v in setting) or "default"
    lines.append(f"| {'-' if row in TEACHERLESS else dual} | {name} | {tag} | {len(seeds)} | "
                 + " | ".join(recipes.fmt([recs[s].get(c, math.nan) for s in seeds]) for c in COLS)
                 + " | " + " | ".join(diffs) + " |")
  return lines


def cmd_table(args) -> None:
  duals = tuple(args.duals)
  head = (f"`python -m benchmarks.protocol run --out {args.out}` then `python -m benchmarks.protocol "
          f"table --out {args.out}`: student `mu/16` + `mu` text (the demo's), {args.steps} steps at "
          f"batch 128, lr 2e-3, teacher outputs from the cache; selection criterion {args.criterion}.")
  val = ["**Selection on val** (5k validation scenes, seed 0, one run per setting):", "", head, "",
         *selection_table(args.out, args.criterion, duals)]
  test = ["**Test** (5k test scenes; mean ± std over n seeds; MCAD - row paired by seed, 95% "
          "t-interval, * where it excludes 0):", "", *test_table(args.out, args.criterion, duals)]
  print("\n".join(val + [""] + test))
  if args.write:
    from benchmarks.report import write_section

    write_section("RESULTS.md", "protocol_val", "Selection on val", val)
    write_section("RESULTS.md", "protocol_test", "MCAD against every recipe at its own best", test)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("command", choices=("run", "table"))
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--steps", type=int, default=STEPS)
  ap.add_argument("--criterion", choices=CRITERIA, default="rsum+hn")
  ap.add_argument("--duals", nargs="+", choices=DUALS, default=list(DUALS))
  ap.add_argument("--data_source", choices=("tfds", "generate"), default="tfds",
                  help="'generate': scenes straight from the generator, no TensorFlow (GPU images)")
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--worker", type=int, default=0)
  ap.add_argument("--write", action="store_true", help="table: write it into RESULTS.md")
  args = ap.parse_args(argv)
  if not 0 <= args.worker < args.workers:
    ap.error(f"--worker must be in [0, {args.workers})")
  {"run": cmd_run, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
