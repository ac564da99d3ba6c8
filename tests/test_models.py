"""Every registered size builds; towers follow the export rules of docs/stack.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcad_jax import config_lib
from mcad_jax.models import layers, two_tower


def _model(image="mu/8", text="mu", size=32, L=16, **kw):
  cfg = config_lib.model_config(image, text, 32, **kw)
  return two_tower.build(cfg, vocab_size=30522, text_len=L), size, L


@pytest.mark.parametrize("name", sorted(two_tower.SIZES))
def test_every_size_builds(name):
  model, _, L = _model(f"{name}/16", name, size=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8),
                          jnp.zeros((1, L), jnp.int32))
  w, d, _, _ = two_tower.SIZES[name]
  assert shapes["params"]["img"]["embedding"]["kernel"].shape == (16, 16, 3, w)
  assert f"block{d - 1}" in shapes["params"]["txt"]["encoder"]


def test_two_tower_outputs_are_normalised():
  model, s, L = _model()
  imgs = jnp.asarray(np.random.default_rng(0).integers(0, 255, (3, s, s, 3)), jnp.uint8)
  ids = jnp.asarray([[101, 1037, 2417, 102] + [0] * (L - 4)] * 3, jnp.int32)
  params = model.init(jax.random.key(0), imgs, ids)["params"]
  zi, zt, aux = model.apply({"params": params}, imgs, ids)
  assert zi.shape == (3, 32) and zt.shape == (3, 32)
  np.testing.assert_allclose(np.linalg.norm(zi, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(zt, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(aux["logit_scale"], 1 / 0.07, rtol=1e-5)
  zi2, _ = model.apply({"params": params}, imgs, method=model.encode_image)
  np.testing.assert_allclose(zi, zi2, atol=1e-6)


def test_padding_does_not_change_text_embedding():
  """Padded positions are masked (bounded fill), so extra pads leave [CLS] unchanged."""
  model, s, L = _model()
  ids = jnp.asarray([[101, 1037, 2417, 102] + [0] * (L - 4)], jnp.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), ids)["params"]
  z1, _ = model.apply({"params": params}, ids, method=model.encode_text)
  m2 = two_tower.build(config_lib.model_config("mu/8", "mu", 32), 30522, L)
  z2, _ = m2.apply({"params": params}, ids[:, :8], method=m2.encode_text)
  np.testing.assert_allclose(z1, z2, atol=1e-5)


def test_export_rules_in_jaxpr():
  """No erf (tanh GELU) and no finfo.min-style mask constants in the text tower."""
  model, s, L = _model()
  ids = jnp.zeros((2, L), jnp.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), ids)["params"]
  jaxpr = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, method=model.encode_text))(
      params, ids))
  assert "erf" not in jaxpr
  assert "-3.4028" not in jaxpr and "-1e+09" not in jaxpr and "-30.0" in jaxpr
  assert "promise_in_bounds" in jaxpr.lower() or "PROMISE_IN_BOUNDS" in jaxpr
  assert layers.MASK_FILL == -30.0


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match="unknown model size 'XXL'"):
    two_tower.size_kwargs("XXL/16")
  with pytest.raises(ValueError, match="bad patch"):
    two_tower.size_kwargs("S/x")
