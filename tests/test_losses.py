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


def _np_softmax(x, axis):
  return np.exp(_np_logsoftmax(x, axis))


def test_kl_sim_matches_numpy():
  rng = np.random.default_rng(2)
  s, t, tau = rng.normal(size=(6, 6)), rng.normal(size=(6, 6)), 0.5

  def kl(tl, sl):
    p = _np_softmax(tl, 1)
    return np.mean(np.sum(p * (_np_logsoftmax(tl, 1) - _np_logsoftmax(sl, 1)), 1))

  want = 0.5 * tau**2 * (kl(t / tau, s / tau) + kl(t.T / tau, s.T / tau))
  np.testing.assert_allclose(losses.kl_sim(s, t, tau), want, rtol=1e-5)
  assert float(losses.kl_sim(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_feature_and_similarity_distances():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  np.testing.assert_allclose(losses.feature_l2(a, b), np.mean(np.sum((a - b) ** 2, 1)), rtol=1e-5)
  np.testing.assert_allclose(losses.sim_l2(a @ b.T, b @ b.T), np.mean((a @ b.T - b @ b.T) ** 2),
                             rtol=1e-5)
  assert float(losses.feature_l2(a, a)) == 0.0 and float(losses.sim_l2(a, a)) == 0.0


def test_itm_bce_matches_numpy():
  logits = np.array([2.0, -1.0, 0.5, 3.0])
  labels = np.array([1, 0, 0, 1])
  w = np.array([1, 1, 0, 1.0])
  per = -(labels * np.log(1 / (1 + np.exp(-logits))) + (1 - labels) * np.log(1 / (1 + np.exp(logits))))
  np.testing.assert_allclose(losses.itm_bce(logits, labels), per.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.itm_bce(logits, labels, w), (per * w).sum() / w.sum(), rtol=1e-5)


def test_hard_negatives_are_off_diagonal_and_follow_similarity():
  import jax

  sim = np.full((8, 8), -5.0, np.float32)
  np.fill_diagonal(sim, 10.0)
  sim[np.arange(8), (np.arange(8) + 1) % 8] = 5.0  # The hardest negative of each row.
  picks = np.stack([np.asarray(losses.sample_hard_negatives(sim, jax.random.key(i))) for i in range(20)])
  assert (picks != np.arange(8)).all()
  assert np.mean(picks == (np.arange(8) + 1) % 8) > 0.9
