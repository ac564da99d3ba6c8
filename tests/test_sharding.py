"""Mesh, FSDP rule, and the same training on 1 and 8 devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import coco, shapes
from mcad_jax import sharding, stages, train


def test_fsdp_spec_rule():
  assert sharding.fsdp_spec((1024, 768), 8, 2**14) == P("fsdp", None)
  assert sharding.fsdp_spec((768, 1024), 8, 2**14) == P(None, "fsdp")
  assert sharding.fsdp_spec((1001, 12), 8, 10) == P()          # Nothing divides by 8.
  assert sharding.fsdp_spec((1002, 16), 8, 10) == P(None, "fsdp")  # Next-largest that divides.
  assert sharding.fsdp_spec((64,), 8, 2**14) == P()             # Too small to shard.
  assert sharding.fsdp_spec((1024, 768), 1, 2**14) == P()


def test_tree_shardings_rules_first_match_wins():
  mesh = sharding.make_mesh((("data", 1), ("fsdp", -1)))
  tree = {"a": {"kernel": np.zeros((64, 512))}, "b": {"kernel": np.zeros((64, 512))},
          "s": np.zeros(())}
  out = sharding.tree_shardings(tree, mesh, [("^b/", "replicate")], min_size=16)
  assert out["a"]["kernel"].spec == P(None, "fsdp")
  assert out["b"]["kernel"].spec == P()
  assert out["s"].spec == P()
  with pytest.raises(ValueError, match="unknown sharding tactic"):
    sharding.tree_shardings(tree, mesh, [(".*", "tp")])


def test_make_mesh():
  assert jax.device_count() == 8
  m = sharding.make_mesh((("data", 2), ("fsdp", -1)))
  assert dict(m.shape) == {"data": 2, "fsdp": 4}
  with pytest.raises(ValueError, match="do not split"):
    sharding.make_mesh((("data", 3), ("fsdp", -1)))
  with pytest.raises(ValueError, match="axes must be"):
    sharding.make_mesh((("fsdp", 1), ("data", -1)))
  one = sharding.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1])
  assert one.size == 1


def _first_step(config, mesh, batch):
  scfg = config.teacher
  stage = stages.build(config, "teacher", "", mesh)
  tx, sched = train.make_optimizer(scfg, stage.freeze)
  init, shard, _ = train.abstract_state(stage, scfg, config, mesh)
  state = jax.jit(init, out_shardings=shard)(train.stage_rng(config.seed, "teacher"))
  step = jax.jit(lambda s, b: train.train_step(s, b, None, loss_fn=stage.loss_fn, tx=tx,
                                               schedule=sched, accum=scfg.accum_steps,
                                               base_rng=jax.random.key(0)),
                 in_shardings=(shard, sharding.batch_sharding(mesh)),
                 out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))
  gbatch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  state, m = step(state, gbatch)
  state, m2 = step(state, gbatch)
  return float(m["training_loss"]), float(m2["training_loss"]), jax.device_get(state["params"])


def _batch(config, n=32):
  rng = np.random.default_rng(0)
  s, L = config.data.image_size, config.data.text_len
  text = rng.integers(1000, 3000, (n, L)).astype(np.int32)
  text[:, 0], text[:, L // 2:] = 101, 0
  return {"image": rng.integers(0, 255, (n, s, s, 3)).astype(np.uint8), "text": text}


def test_fsdp_8_devices_matches_1_device():
  config = shapes.get_config("smoke")
  batch = _batch(config)
  one = sharding.make_mesh(config.mesh, jax.devices()[:1])
  eight = sharding.make_mesh(config.mesh)
  l1a, l1b, p1 = _first_step(config, one, batch)
  l8a, l8b, p8 = _first_step(config, eight, batch)
  assert abs(l1a - l8a) < 1e-5 * abs(l1a)
  assert abs(l1b - l8b) < 1e-4 * abs(l1b)
  # Adam normalises each gradient, so a parameter whose gradient is float noise can
  # move by up to lr either way; everything else agrees far more tightly.
  lr = config.teacher.optim.lr
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
    np.testing.assert_allclose(a, b, atol=2 * lr)


def test_grad_accumulation_runs_on_micro_batches():
  """With accum_steps=2 the step still runs and gives a finite, nearby loss."""
  config = shapes.get_config("smoke")
  config.teacher.accum_steps = 2
  batch = _batch(config)
  loss, _, _ = _first_step(config, sharding.make_mesh(config.mesh), batch)
  config.teacher.accum_steps = 1
  l_full, _, _ = _first_step(config, sharding.make_mesh(config.mesh), batch)
  assert np.isfinite(loss)
  # Half-size contrastive batches have fewer negatives: a lower loss than the full batch.
  assert loss < l_full


@pytest.mark.slow  # ~45 s: compiles the ViT-B/16 init on 1 and 8 devices
def test_coco_teacher_state_is_sharded_8_ways():
  """Compiled, not run: per-device params+opt on 8 devices <= 1/6 of 1 device."""
  config = coco.get_config()
  one = sharding.make_mesh(config.mesh, jax.devices()[:1])
  eight = sharding.make_mesh(config.mesh)
  b1 = train.state_bytes_per_device(config, "teacher", one)
  b8 = train.state_bytes_per_device(config, "teacher", eight)
  assert b1 > 1e9  # ViT-B/16 + B text: > 100M params x (param + 2 moments) x 4 bytes.
  assert b8 <= b1 / 6, (b1, b8)


def test_bf16_compute_tracks_f32():
  config = shapes.get_config("smoke")
  batch = _batch(config)
  mesh = sharding.make_mesh(config.mesh)
  l32, _, _ = _first_step(config, mesh, batch)
  config.teacher.model.dtype = "bfloat16"
  l16, _, p16 = _first_step(config, mesh, batch)
  assert abs(l16 - l32) < 0.05 * l32
  # Params stay float32; only compute is bf16.
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))
