"""The benchmarks' own arithmetic (their timings are not tests)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.train_step import matmul_flops


def test_matmul_flops_counts_dots_scans_and_gradients():
  x, w = jnp.ones((8, 32)), jnp.ones((32, 16))
  assert matmul_flops(jax.make_jaxpr(jnp.dot)(x, w)) == 2 * 8 * 32 * 16
  f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum())
  # Forward, then the two matmuls of the backward pass (dx and dw), through jit's sub-jaxpr.
  assert matmul_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)) == 3 * 2 * 8 * 32 * 16

  def body(c, _):
    return c @ jnp.ones((32, 32)), None

  scanned = jax.make_jaxpr(lambda c: jax.lax.scan(body, c, None, length=5)[0])(x)
  assert matmul_flops(scanned) == 5 * 2 * 8 * 32 * 32
  img, k = jnp.ones((2, 16, 16, 3)), jnp.ones((4, 4, 3, 8))  # 4x4 patches, stride 4.
  conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (4, 4), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert matmul_flops(jax.make_jaxpr(conv)(img, k)) == pytest.approx(2 * (2 * 4 * 4 * 8) * 4 * 4 * 3)


def test_recipes_set_that_restates_the_default_is_not_a_sweep():
  from benchmarks.recipes import is_sweep
  from configs import shapes

  c = shapes.get_config("demo")
  label = c.distill.hard_label_weight
  assert not is_sweep(c, [f"hard_label_weight={label}", "data.source=generate"])
  assert is_sweep(c, [f"hard_label_weight={label + 1}"])
  assert is_sweep(c, ["mcad.alpha=0.3"])
  assert not is_sweep(c, [f"mcad.alpha={c.distill.mcad.alpha}"])
  assert c.distill.hard_label_weight == label  # the config itself is left as it was


def test_recipes_header_gives_the_command_that_reproduces_the_table():
  import argparse

  from benchmarks.recipes import OUT, command_line

  args = argparse.Namespace(teachers="shipped", seeds=[0, 1], steps=1500, recipes=["mcad"],
                            set=["model.embed_dim=128"], out="workdirs/wide")
  line = command_line(args, sweep=True)
  assert line == ("python benchmarks/recipes.py --teachers shipped --seeds 0 1 --steps 1500 "
                  "--recipes mcad --set model.embed_dim=128 --out workdirs/wide")
  args.recipes, args.set, args.out = None, [], OUT
  assert command_line(args, sweep=False).endswith("--seeds 0 1 --steps 1500 --write")


def test_distill_overhead_paper_variant_has_random_demo_teachers():
  from benchmarks.distill_overhead import overhead_config
  from configs import shapes

  c = overhead_config("paper_t6", 16)
  demo = shapes.get_config("demo")
  assert c.teacher.weights is None and c.fusion_teacher.weights is None  # random, not shipped
  assert c.teacher.model.image == demo.teacher.model.image
  assert (c.data.image_size, c.distill.batch_size, c.distill.model.text) == (224, 16, "S")
  assert c.distill.model.text_kw["depth"] == 6
  assert c.distill.hard_columns == demo.distill.hard_columns
