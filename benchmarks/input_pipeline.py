"""Input pipeline ÷ train step on the demo config: can the pipeline feed the step?

  python -m benchmarks.input_pipeline [--batches=30] [--steps=10] [--write]

Measured in one run, one process, on the demo's distill stage (`configs/shapes.py`: the MCAD
student with hard columns and online teachers from the shipped weights, batch 128):
- examples/s the input pipeline delivers (grain over the prepared TFDS files, the config's
  threads: decode, caption choice, every tokenizer the stage needs, batching), and the same
  with `data.source=generate` (scenes rendered on read, the TF-free path), timed over
  --batches batches after 3 warm-up batches, with no training in between;
- examples/s the jitted, donated train step consumes on one of those real batches.
The ratio is pipeline ÷ step: at 2 or more the pipeline keeps the step busy with room to spare
(on this machine the two share the same 2 cores when training, so the ratio is an upper bound
of the headroom). With --write the table replaces the section between the markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks import report, train_step as bench  # noqa: E402
from mcad_jax import sharding, stages  # noqa: E402
from mcad_jax.data import pipeline  # noqa: E402


def pipeline_rate(config, stage, batches: int) -> tuple[float, dict]:
  scfg = config.distill
  it = pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config),
                               scfg.batch_size, seed=0, extra=stage.extra_tokenizers)
  for _ in range(3):
    batch = next(it)
  t = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    if stage.host_fn is not None:
      batch = stage.host_fn(batch)
  return batches * scfg.batch_size / (time.perf_counter() - t), batch


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/shapes.py:demo")
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
  args = ap.parse_args()

  config = bench.load_config(args.config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  stage = stages.build(config, "distill", "", mesh)
  tfds_rate, batch = pipeline_rate(config, stage, args.batches)
  gen = config.copy_and_resolve_references()
  gen.data.source = "generate"
  gen_rate, _ = pipeline_rate(gen, stage, args.batches)
  step = bench.step_throughput(config, "distill", args.steps, batch, stage, mesh)["examples_per_s"]
  d = config.distill
  body = [
      f"`python -m benchmarks.input_pipeline --config={args.config} --batches={args.batches} "
      f"--steps={args.steps} --write` on {platform.machine()}, {os.cpu_count()} cores, 1 CPU "
      f"device, jax {jax.__version__}: the demo's distill stage ({d.recipe}, hard columns "
      f"{'on' if d.hard_columns else 'off'}, teachers {'cached' if d.cache else 'online'}), batch "
      f"{d.batch_size}, {config.data.num_threads} input threads; pipeline and step timed apart, "
      "in the same process.",
      "",
      "| what | examples/s | ÷ train step |",
      "|---|---|---|",
      f"| input pipeline, prepared TFDS files (`data.source=tfds`) | {tfds_rate:,.0f} "
      f"| {tfds_rate / step:.1f} |",
      f"| input pipeline, rendered on read (`data.source=generate`) | {gen_rate:,.0f} "
      f"| {gen_rate / step:.1f} |",
      f"| train step (distill) | {step:,.0f} | 1.0 |",
  ]
  print("\n".join(body))
  if args.write:
    report.write_section("BENCHMARKS.md", "input_pipeline", "Input pipeline vs the train step", body)


if __name__ == "__main__":
  main()
