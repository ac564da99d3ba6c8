"""Binding: the twin-softmax and hard-column losses against NumPy, the curriculum schedule,
the CoordConv fusion tokens and the 'moments' poolings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcad_jax import config_lib, curriculum, losses
from mcad_jax.models.fusion import ConvStem, FusionTeacher
from mcad_jax.models.text import TextTransformer
from mcad_jax.models.vit import ViT
from mcad_jax.recipes import hard_columns


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_candidate_softmax_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  valid = rng.random((6, 5)) > 0.3
  valid[:, 0] = True
  valid[4, 0] = False          # an invalid positive: the row does not count
  weights = np.array([1, 0, 1, 1, 1, 0.5], np.float32)
  want_rows, want_w = [], []
  for i in range(6):
    cols = np.flatnonzero(valid[i])
    if not valid[i, 0]:
      continue
    want_rows.append(-_log_softmax(logits[i, cols])[0])
    want_w.append(weights[i])
  want = np.dot(want_rows, want_w) / np.sum(want_w)
  got = losses.candidate_softmax(jnp.asarray(logits), jnp.asarray(valid), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The loss falls as column 0 wins.
  better = logits.copy()
  better[:, 0] += 5
  assert float(losses.candidate_softmax(better, valid, weights)) < float(got)


def test_kl_candidates_matches_numpy_and_vanishes_at_equality():
  rng = np.random.default_rng(1)
  t, s = (rng.normal(size=(5, 3)).astype(np.float32) * 2 for _ in range(2))
  valid = np.ones((5, 3), bool)
  valid[1, 2] = False
  valid[3, 1:] = False         # one valid column: no distribution to match, row skipped
  want, n = 0.0, 0
  for i in range(5):
    cols = np.flatnonzero(valid[i])
    if len(cols) < 2:
      continue
    lt, ls = _log_softmax(t[i, cols]), _log_softmax(s[i, cols])
    want += np.sum(np.exp(lt) * (lt - ls))
    n += 1
  np.testing.assert_allclose(float(losses.kl_candidates(t, s, valid)), want / n, rtol=1e-5)
  assert float(losses.kl_candidates(t, t, valid)) == pytest.approx(0.0, abs=1e-6)


def test_grounding_xent_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 2, 16)).astype(np.float32) * 2
  cells = np.array([[3, 12], [0, -1], [-1, -1], [15, 5]], np.int32)
  weights = np.array([1.0, 1.0, 1.0, 0.5], np.float32)
  num, den = 0.0, 0.0
  for i in range(4):
    for j in range(2):
      if cells[i, j] >= 0:
        num -= weights[i] * _log_softmax(logits[i, j])[cells[i, j]]
        den += weights[i]
  got = losses.grounding_xent(jnp.asarray(logits), jnp.asarray(cells), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), num / den, rtol=1e-5)
  # Scores that point at the right cells lower it; a batch with no named objects costs 0.
  better = logits.copy()
  for i, j in ((0, 0), (0, 1), (1, 0), (3, 0), (3, 1)):
    better[i, j, cells[i, j]] += 5
  assert float(losses.grounding_xent(better, cells, weights)) < float(got)
  assert float(losses.grounding_xent(logits, np.full((4, 2), -1), weights)) == 0.0


def test_gumbel_top_k_draws_distinct_off_diagonal_columns():
  scores = jnp.asarray(np.random.default_rng(2).normal(size=(16, 16)), jnp.float32)
  idx = np.asarray(losses.gumbel_top_k(scores, jax.random.key(0), 4))
  assert idx.shape == (16, 4)
  for i, row in enumerate(idx):
    assert i not in row and len(set(row)) == 4


def test_hard_columns_validity_and_accuracy():
  batch = {"hn_true_valid": jnp.array([True, True, False]),
           "hn_relation_valid": jnp.array([True, True, True]),
           "hn_attribute_valid": jnp.array([True, False, True])}
  valid, w = hard_columns.hard_valid(batch)
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(w, [1, 1, 0])
  logits = jnp.array([[2.0, 1.0, 3.0], [1.0, 0.0, 9.0], [0.0, 5.0, 5.0]])
  # Wins: row 0 beats its relation twin, not its attribute twin; row 1 beats its one twin.
  assert float(hard_columns.hard_accuracy(logits, valid)) == pytest.approx(2 / 3)


def test_curriculum_schedule():
  sched = ((100, 2, "attribute"), (300, 3, "attribute,relation"))
  want = {0: (2, 0, 1), 99: (2, 0, 1), 100: (3, 1, 1), 299: (3, 1, 1),
          300: (curriculum.ALL_OBJECTS, 1, 1), 10_000: (curriculum.ALL_OBJECTS, 1, 1)}
  for step, (mo, rel, attr) in want.items():
    got = jax.jit(lambda s: curriculum.at_step(sched, s))(jnp.int32(step))
    assert (int(got["max_objects"]), float(got["relation"]), float(got["attribute"])) == (mo, rel, attr)
  assert int(curriculum.at_step((), 5)["max_objects"]) == curriculum.ALL_OBJECTS
  for bad, msg in (([(10, 2, "colour")], "unknown twin kinds"), ([(10, 2, ""), (5, 3, "")], "must grow"),
                   ([(10, 0, "")], "max_objects"), ([(10, 2)], "must be")):
    with pytest.raises(ValueError, match=msg):
      curriculum.validate(bad)


def test_conv_stem_tokens_know_where_they_are():
  stem = ConvStem(width=16)
  img = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  p = stem.init(jax.random.key(0), img)["params"]
  out = stem.apply({"params": p}, img)
  assert out.shape == (1, 4, 16)
  # A blank image still gives distinct tokens per cell: coordinates and 2D positions.
  assert float(jnp.min(jnp.linalg.norm(out[0, :, None] - out[0, None], axis=-1) + jnp.eye(4))) > 0


def _moved(img, src, dst, size=16):
  out = img.copy()
  (r0, c0), (r1, c1) = src, dst
  out[:, r1 * size:(r1 + 1) * size, c1 * size:(c1 + 1) * size] = img[:, r0 * size:(r0 + 1) * size,
                                                                      c0 * size:(c0 + 1) * size]
  out[:, r0 * size:(r0 + 1) * size, c0 * size:(c0 + 1) * size] = 0
  return out


def test_vit_moments_pool_sees_positions_that_gap_does_not():
  img = np.zeros((1, 32, 32, 3), np.uint8)
  img[:, :16, :16] = 200                        # one bright cell, top left
  other = _moved(img, (0, 0), (0, 1))           # the same cell moved right
  outs = {}
  for pool in ("gap", "moments"):
    vit = ViT(width=8, depth=0, heads=1, mlp_dim=8, patch=16, pool=pool)
    p = vit.init(jax.random.key(0), img)["params"]
    p = {**p, "pos_embedding": jnp.zeros_like(p["pos_embedding"])}   # no position table
    outs[pool] = [np.asarray(vit.apply({"params": p}, x)[0]) for x in (img, other)]
  np.testing.assert_allclose(*outs["gap"], atol=1e-5)           # a bag of patches
  assert outs["moments"][0].shape == (1, 24)
  np.testing.assert_allclose(outs["moments"][0][:, :8], outs["moments"][1][:, :8], atol=1e-5)
  assert np.abs(outs["moments"][0][:, 8:16] - outs["moments"][1][:, 8:16]).max() > 1e-3  # x moment


def test_text_moments_pool_sees_word_order():
  tt = TextTransformer(vocab_size=10, max_len=6, width=8, depth=0, heads=1, mlp_dim=8, pool="moments")
  ids = jnp.array([[1, 3, 4, 2, 0, 0], [1, 4, 3, 2, 0, 0]])
  p = tt.init(jax.random.key(0), ids)["params"]
  p["pos_embedding"] = jnp.zeros_like(p["pos_embedding"])
  out = np.asarray(tt.apply({"params": p}, ids)[0])
  np.testing.assert_allclose(out[0, :8], out[1, :8], atol=1e-6)    # same bag of words
  assert np.abs(out[0, 8:] - out[1, 8:]).max() > 1e-3              # different order


def test_fusion_teacher_conv_and_embed_sources():
  dual = dict(image=dict(width=16, depth=1, heads=2, mlp_dim=32, patch=16),
              text=dict(vocab_size=20, max_len=8, width=16, depth=1, heads=2, mlp_dim=32),
              embed_dim=8)
  model = FusionTeacher(dual=dual, fusion=dict(width=16, depth=1, heads=2, mlp_dim=32),
                        context="conv", text_source="embed")
  img = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  ids = jnp.array([[1, 5, 6, 2, 0, 0, 0, 0], [1, 6, 5, 2, 0, 0, 0, 0]])
  params = model.init(jax.random.key(0), img, ids)["params"]
  assert "stem" in params and "txt_pos_embedding" in params
  f, itm, aux = model.apply({"params": params}, img, ids)
  assert f.shape == (2, 16) and itm.shape == (2,)
  assert aux["img"]["ctx"].shape == (2, 4, 16)
  # Word embeddings + positions: swapping two words changes the match logit.
  assert abs(float(itm[0]) - float(itm[1])) > 1e-6
  assert "ground_head" not in params and "ground" not in aux
  grounded = FusionTeacher(dual=dual, fusion=dict(width=16, depth=1, heads=2, mlp_dim=32),
                           context="conv", text_source="embed", grounding_cells=4)
  gp = grounded.init(jax.random.key(0), img, ids)["params"]
  assert gp["ground_head"]["kernel"].shape == (16, 8)
  scores = grounded.apply({"params": gp}, f, method=grounded.ground)
  assert scores.shape == (2, 2, 4)


def test_grounding_config_is_checked():
  config = config_lib.load_file("configs/shapes.py:smoke")
  config.fusion_teacher.fusion.grounding_weight = 1.0
  config_lib.validate(config)                       # softmax loss on shapes: fine
  config.fusion_teacher.fusion.loss = "itm"
  with pytest.raises(config_lib.ConfigError, match="fusion_teacher.fusion.grounding_weight.*softmax"):
    config_lib.validate(config)
  config.fusion_teacher.fusion.loss = "softmax"
  config.data.tfds_name = "coco_captions"
  with pytest.raises(config_lib.ConfigError, match="grounding_weight.*not a shapes dataset"):
    config_lib.validate(config)
