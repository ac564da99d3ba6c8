"""Distillation step time / student-alone step time, online teachers vs the teacher cache.

  python -m benchmarks.distill_overhead [--steps 30] [--write]
  python -m benchmarks.distill_overhead --variant paper_t6 --batch 16 --steps 10 [--write]

Same student, batch and machine, in one run: the student trained alone,
MCAD with the teachers run online inside the step (dual teacher + fusion
teacher forward), and MCAD reading teacher outputs from the per-example cache
(host gather included). Teacher weights are random: time does not depend on
them. The data are shapes/tiny upscaled to the student's input size, so the cache
builds in seconds; every timed step feeds the same host batch through the same path.

`--variant demo` (default) is the demo's student; `paper_t2|t4|t6` the paper-scale
ViT-S/16 student at 224 px of `configs/shapes.py:paper_*`, distilled from the demo's
teachers (they read the same 224 px images). With the cache the teachers' size does not
enter the step, only their embedding width, so the cache row at paper scale is the
overhead a paper-scale run pays; the online row is for the demo-sized teachers only.
With --write the table replaces the section between the markers in BENCHMARKS.md
(`distill_overhead` for the demo, `distill_overhead_paper` for a paper variant).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.shapes import PAPER_VARIANTS  # noqa: E402


def overhead_config(variant: str, batch: int | None):
  """The variant's config with random teachers (no shipped weights) on shapes/tiny."""
  from configs import shapes

  config = shapes.get_config("demo")
  if variant != "demo":  # Built on the demo config, so its teachers are the demo's; its student
    # trains alone, without the hard columns the demo's distillation carries. Give it those.
    demo_distill = config.distill
    config = shapes.paper_config(variant)
    config.distill.hard_columns = demo_distill.hard_columns
    config.distill.hard_label_weight = demo_distill.hard_label_weight
  config.teacher.weights = config.fusion_teacher.weights = None
  config.data.tfds_name = "shapes/tiny"  # Resized to the student's input; the cache builds fast.
  if batch:
    config.distill.batch_size = batch
  return config


def make_teachers(config, workdir, mesh):
  from mcad_jax import checkpoint, stages

  for name in ("teacher", "fusion_teacher"):
    st = stages.build(config, name, workdir, mesh)
    params = jax.jit(st.init)(jax.random.key(0))
    ck = checkpoint.Checkpointer(os.path.join(workdir, name, "checkpoints"), async_save=False)
    ck.save(1, {"params": params, "step": jnp.int32(1)}, {"iter": {}})
    ck.close()


def step_fn(config, workdir, mesh):
  """A no-argument function that runs one training step of the distill stage (host batch
  assembly, transfer, and the jitted step) and waits for it."""
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
  host = next(pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config),
                                      scfg.batch_size, 0, extra=stage.extra_tokenizers))

  box = [state]

  def one():
    b = stage.host_fn(host) if stage.host_fn else host
    b = sharding.to_global({k: b[k] for k in stage.batch_keys}, mesh)
    box[0], m = fn(box[0], b, stage.frozen)
    jax.block_until_ready(m)

  return one


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--variant", default="demo", choices=("demo",) + PAPER_VARIANTS)
  ap.add_argument("--batch", type=int, default=None, help="default: the variant's own")
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()

  from benchmarks.report import medians_in_turns
  from mcad_jax import main as mcad_main, sharding

  mcad_main.setup_logging()
  config = overhead_config(args.variant, args.batch)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with tempfile.TemporaryDirectory() as w:
    config.data.data_dir = ""
    config.distill.cache_dir = os.path.join(w, "teacher_cache")  # Random teachers: not the user's.
    make_teachers(config, w, mesh)
    cases = (("student alone", "student_only", False), ("MCAD, online teachers", "mcad", False),
             ("MCAD, teacher cache", "mcad", True))
    fns = {}
    for label, recipe, cache in cases:
      config.distill.recipe, config.distill.cache = recipe, cache
      fns[label] = step_fn(config, w, mesh)
    ms = medians_in_turns(fns, args.steps, warmup=2)
  base = ms["student alone"]
  flags = "".join(f" --{k} {v}" for k, v in (("variant", args.variant), ("batch", args.batch))
                  if v and v != "demo")
  lines = [f"`python -m benchmarks.distill_overhead{flags} --steps {args.steps} --write` on "
           f"{platform.machine()}, {os.cpu_count()} cores, 1 CPU device, jax {jax.__version__}. "
           f"Student `{config.distill.model.image}` + `{config.distill.model.text}` text at "
           f"{config.data.image_size} px, teachers "
           f"`{config.teacher.model.image}` + `{config.teacher.model.text}` and a "
           f"{config.fusion_teacher.fusion.depth}-layer `{config.fusion_teacher.fusion.size}` "
           f"fusion; batch {config.distill.batch_size}; median of {args.steps} steps each, the "
           "three steps taking turns.",
           "",
           "| step | ms/step | ÷ student alone |",
           "|---|---|---|"]
  lines += [f"| {label} | {t:.1f} | {t / base:.2f} |" for label, t in ms.items()]
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    section = "distill_overhead" if args.variant == "demo" else "distill_overhead_paper"
    write_section("BENCHMARKS.md", section, "Distillation overhead", lines)

if __name__ == "__main__":
  main()
