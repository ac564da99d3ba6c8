"""LayerNorm variance, one pass vs two passes: train-step time of the demo teacher, same run.

  python -m benchmarks.layernorm [--reps 15] [--write]

Times jit(grad(InfoNCE)) of the `configs/shapes.py` demo teacher at batch 128 on
1 CPU device, once with flax's one-pass variance (training's choice) and once
with the two-pass form the export traces with (mcad_jax/models/layers.py),
alternating twice. With --write the table goes into BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def step_ms(two_pass: bool, reps: int) -> float:
  from configs import shapes
  from mcad_jax import losses
  from mcad_jax.models import layers, two_tower

  c = shapes.get_config("demo")
  ctx = layers.two_pass_layer_norm() if two_pass else contextlib.nullcontext()
  m = two_tower.build(c.teacher.model, 30522, c.data.text_len)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 255, (128, 64, 64, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(1, 30000, (128, c.data.text_len)), jnp.int32)
  p = m.init(jax.random.key(0), x[:1], t[:1])["params"]

  def loss(p):
    with ctx:
      zi, zt, aux = m.apply({"params": p}, x, t)
    return losses.infonce(zi, zt, aux["logit_scale"])

  from benchmarks.report import median_ms

  g = jax.jit(jax.grad(loss))
  return median_ms(lambda: jax.block_until_ready(g(p)), reps, warmup=1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()
  rows = [(step_ms(False, args.reps), step_ms(True, args.reps)) for _ in range(2)]
  lines = [f"`python -m benchmarks.layernorm --reps {args.reps} --write` on {platform.machine()}, "
           f"{os.cpu_count()} cores, 1 CPU device, jax {jax.__version__}: demo teacher "
           "(`nano/16` + `mu`), batch 128, median ms per jit(grad) step; the two forms alternate.",
           "",
           "| round | one-pass variance (training) | two-pass (export) | two-pass / one-pass |",
           "|---|---|---|---|"]
  lines += [f"| {i + 1} | {a:.1f} | {b:.1f} | {b / a:.2f} |" for i, (a, b) in enumerate(rows)]
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("BENCHMARKS.md", "layernorm", "LayerNorm variance: one pass vs two", lines)


if __name__ == "__main__":
  main()
