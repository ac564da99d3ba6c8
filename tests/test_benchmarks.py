"""The benchmarks' own arithmetic (their timings are not tests)."""

import jax
import jax.numpy as jnp
import numpy as np
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
  assert line == ("python -m benchmarks.recipes --teachers shipped --seeds 0 1 --steps 1500 "
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


def test_protocol_gives_every_recipe_the_same_grid():
  from benchmarks import protocol

  base = {r.setting for r in protocol.val_runs(("shipped",)) if r.row == "clip_kd"}
  assert len(base) == 6
  for row in ("tinyclip", "conaclip"):
    assert {r.setting for r in protocol.val_runs(("shipped",)) if r.row == row} == base
  mcad = {r.setting for r in protocol.val_runs(("shipped",)) if r.row == "mcad"}
  assert len(mcad) == 18
  assert {tuple(kv for kv in s if kv[0] != "mcad.alpha") for s in mcad} == base
  # Every run of the selection phase reads val, none reads test.
  for r in protocol.val_runs():
    assert protocol.config_for(r, "/nonexistent").data.test_split == "validation"
  assert all(r.phase == "val" and r.seed == 0 for r in protocol.val_runs())


def _done(path, rsum, rel, attr):
  import json
  import os

  os.makedirs(os.path.join(path, "distill"))
  with open(os.path.join(path, "distill", "done.json"), "w") as f:
    json.dump({"retrieval": {"student": {"rsum": rsum, "hn_relation": rel, "hn_attribute": attr}}}, f)


def test_protocol_selects_on_val_then_runs_the_choice_at_five_seeds(tmp_path):
  from benchmarks import protocol

  out = str(tmp_path)
  runs = [r for r in protocol.val_runs(("shipped",)) if r.row == "clip_kd"]
  for i, r in enumerate(runs):
    _done(r.workdir(out), 300 + i, 50, 50 - 3 * i)  # rsum+hn is best at i == 0, rsum at the last
  assert protocol.selected(out, "rsum+hn", ("shipped",))[("shipped", "clip_kd")] == runs[0]
  assert protocol.selected(out, "rsum", ("shipped",))[("shipped", "clip_kd")] == runs[-1]
  tests = protocol.test_runs(out, "rsum+hn", ("shipped",))
  assert {(r.row, r.setting, r.phase) for r in tests} == {("clip_kd", runs[0].setting, "test")}
  assert sorted(r.seed for r in tests) == list(protocol.TEST_SEEDS)
  assert protocol.config_for(tests[0], out).data.test_split == "test"
  # A row with an unfinished grid is not selected yet.
  assert ("shipped", "mcad") not in protocol.selected(out, "rsum+hn", ("shipped",))


def test_protocol_paired_interval():
  from benchmarks import protocol

  mean, lo, hi = protocol.paired_ci([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3
  half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2) * sd (1) / sqrt(n)
  assert mean == pytest.approx(2.0)
  assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half))
