"""Loss functions against NumPy references."""

import numpy as np
import pytest

from mcad_jax import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_logsoftmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_infonce(zi, zt, s):
  logits = s * zi @ zt.T
  i2t = -np.mean(np.diag(_np_logsoftmax(logits, 1)))
  t2i = -np.mean(np.diag(_np_logsoftmax(logits, 0)))
  return (i2t + t2i) / 2


def np_sigmoid(zi, zt, s, b):
  logits = s * zi @ zt.T + b
  labels = 2 * np.eye(len(zi)) - 1
  return np.sum(np.log1p(np.exp(-labels * logits))) / len(zi)


@pytest.fixture
def emb():
  rng = np.random.default_rng(0)
  return _unit(rng.normal(size=(16, 8))).astype(np.float32), _unit(rng.normal(size=(16, 8))).astype(
      np.float32)


def test_infonce_matches_numpy(emb):
  zi, zt = emb
  np.testing.assert_allclose(losses.infonce(zi, zt, 10.0), np_infonce(zi, zt, 10.0), rtol=1e-5)


def test_sigmoid_matches_numpy(emb):
  zi, zt = emb
  np.testing.assert_allclose(losses.sigmoid(zi, zt, 10.0, -5.0), np_sigmoid(zi, zt, 10.0, -5.0),
                             rtol=1e-5)


def test_infonce_prefers_matched_pairs(emb):
  zi, _ = emb
  rng = np.random.default_rng(1)
  shuffled = zi[rng.permutation(len(zi))]
  assert losses.infonce(zi, zi, 20.0) < losses.infonce(zi, shuffled, 20.0)


def test_contrastive_rejects_unknown_kind(emb):
  with pytest.raises(ValueError, match="unknown contrastive loss"):
    losses.contrastive("hinge", *emb, 1.0, 0.0)
