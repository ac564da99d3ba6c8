"""Distillation step time / student-alone step time, online teachers vs the teacher cache.

  python benchmarks/distill_overhead.py [--steps 30] [--write]

Same student, batch and machine, in one run: the demo's student trained alone,
MCAD with the teachers run online inside the step (dual teacher + fusion
teacher forward), and MCAD reading teacher outputs from the per-example cache
(host gather included). Teacher weights are random: time does not depend on
them. The data are shapes/tiny upscaled to the demo's 64 px, so the cache builds
in seconds; every timed step feeds the same host batch through the same path.
With --write the table replaces the section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def make_teachers(config, workdir, mesh):
  from mcad_jax import checkpoint, stages

  for name in ("teacher", "fusion_teacher"):
    st = stages.build(config, name, workdir, mesh)
    params = jax.jit(st.init)(jax.random.key(0))
    ck = checkpoint.Checkpointer(os.path.join(workdir, name, "checkpoints"), async_save=False)
    ck.save(1, {"params": params, "step": jnp.int32(1)}, {"iter": {}})
    ck.close()


def time_stage(config, workdir, mesh, steps):
  from mcad_jax import sharding, stages, train
  from mcad_jax.data import pipeline

  scfg = config.distill
  stage = stages.build(config, "distill", workdir, mesh)
  tx, sched = train.make_optimizer(scfg, stage.freeze)
  init, shard, _ = train.abstract_state(stage, scfg, config, mesh)
  state = jax.jit(init, out_shardings=shard)(jax.random.key(0))
  frozen_sh = jax.tree.map(lambda x: x.sharding, stage.frozen)
  fn = jax.jit(lambda s, b, f: train.train_step(s, b, f, loss_fn=stage.loss_fn, tx=tx, schedule=sched,
                                                accum=1, base_rng=jax.random.key(0)),
               in_shardings=(shard, sharding.batch_sharding(mesh), frozen_sh),
               out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))
  host = next(pipeline.train_iterator(config.data, stages.tokenizer(config), scfg.batch_size, 0))

  def one(state):
    b = stage.host_fn(host) if stage.host_fn else host
    b = sharding.to_global({k: b[k] for k in stage.batch_keys}, mesh)
    return fn(state, b, stage.frozen)

  for _ in range(3):
    state, m = one(state)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = one(state)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()

  from configs import shapes
  from mcad_jax import main as mcad_main, sharding

  mcad_main.setup_logging()
  config = shapes.get_config("demo")
  config.data.tfds_name = "shapes/tiny"  # 64 px after resize; the cache builds fast.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rows = []
  with tempfile.TemporaryDirectory() as w:
    config.data.data_dir = ""
    make_teachers(config, w, mesh)
    cases = (("student alone", "student_only", False), ("MCAD, online teachers", "mcad", False),
             ("MCAD, teacher cache", "mcad", True))
    for label, recipe, cache in cases:
      config.distill.recipe, config.distill.cache = recipe, cache
      rows.append((label, time_stage(config, w, mesh, args.steps)))
  base = rows[0][1]
  lines = [f"`python benchmarks/distill_overhead.py --steps {args.steps} --write` on "
           f"{platform.machine()}, {os.cpu_count()} cores, 1 CPU device, jax {jax.__version__}. "
           f"Student `{config.distill.model.image}` + `{config.distill.model.text}` text, teachers "
           f"`{config.teacher.model.image}` + `{config.teacher.model.text}` and a "
           f"{config.fusion_teacher.fusion.depth}-layer `{config.fusion_teacher.fusion.size}` "
           f"fusion; batch {config.distill.batch_size}.",
           "",
           "| step | ms/step | ÷ student alone |",
           "|---|---|---|"]
  lines += [f"| {label} | {1e3 * t:.1f} | {t / base:.2f} |" for label, t in rows]
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("BENCHMARKS.md", "distill_overhead", "Distillation overhead", lines)

if __name__ == "__main__":
  main()
