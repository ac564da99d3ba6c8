"""Retrieval metrics against a brute-force NumPy reference."""

import numpy as np
import pytest

from mcad_jax import evaluate


def np_recalls(zi, zt):
  sim = zi @ zt.T
  n = len(zi)
  i2t, t2i = [], []
  for i in range(n):
    own = np.zeros(5 * n, bool)
    own[5 * i:5 * i + 5] = True
    best = sim[i, own].max()
    i2t.append(int(np.sum(sim[i, ~own] >= best)))
  for j in range(5 * n):
    col = sim[:, j]
    others = np.arange(n) != j // 5
    t2i.append(int(np.sum(col[others] >= col[j // 5])))
  out = {}
  for name, r in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
    for k in (1, 5, 10):
      out[f"{name}_r{k}"] = 100 * np.mean(r < k)
  return out


def test_recalls_match_bruteforce():
  rng = np.random.default_rng(0)
  n, e = 37, 6
  zi = rng.normal(size=(n, e)).astype(np.float32)
  zt = np.repeat(zi, 5, axis=0) + rng.normal(scale=1.5, size=(5 * n, e)).astype(np.float32)
  got = evaluate.recall_metrics(zi, zt, block=8)
  want = np_recalls(zi, zt)
  for k, v in want.items():
    assert abs(got[k] - v) < 1e-6, k
  assert abs(got["rsum"] - sum(want.values())) < 1e-4
  assert 0 < got["i2t_r1"] < 100


def test_perfect_and_constant_embeddings():
  eye = np.eye(12, dtype=np.float32)
  perfect = evaluate.recall_metrics(eye, np.repeat(eye, 5, axis=0))
  assert perfect["rsum"] == 600.0
  # All-equal scores: ties count against the model, so nothing is retrieved at R@1.
  const = np.ones((12, 4), np.float32)
  assert evaluate.recall_metrics(const, np.repeat(const, 5, axis=0))["i2t_r1"] == 0.0


def test_hard_negative_metrics():
  zi = np.eye(4, dtype=np.float32)
  hard = {"true": np.arange(4), "relation": np.arange(4), "attribute": np.arange(4),
          "true_valid": np.array([1, 1, 1, 0], bool), "relation_valid": np.ones(4, bool),
          "attribute_valid": np.zeros(4, bool)}
  enc = lambda ids: np.eye(4, dtype=np.float32)[ids] if ids is hard["true"] else -np.eye(
      4, dtype=np.float32)[ids]
  out = evaluate.hard_negative_metrics(zi, enc, hard)
  assert out == {"hn_relation": 100.0}


def test_rerank_with_the_dual_score_changes_nothing_and_an_oracle_helps():
  rng = np.random.default_rng(4)
  n, e = 40, 6
  zi = rng.normal(size=(n, e)).astype(np.float32)
  zt = np.repeat(zi, 5, axis=0) + rng.normal(scale=1.2, size=(5 * n, e)).astype(np.float32)
  dual = evaluate.recall_metrics(zi, zt)
  same = evaluate.rerank_metrics(zi, zt, lambda i, t: np.sum(zi[i] * zt[t], axis=1), k=10)
  assert same == dual
  oracle = evaluate.rerank_metrics(zi, zt, lambda i, t: (t // 5 == i).astype(np.float32), k=10)
  # A perfect re-ranker puts every true match found in the top 10 first.
  assert oracle["i2t_r1"] == dual["i2t_r10"] and oracle["t2i_r1"] == dual["t2i_r10"]
  assert oracle["i2t_r10"] == dual["i2t_r10"]


def test_twin_accuracy_splits_heldout_from_seen_rows():
  s_true = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  twins = {"relation": np.array([0.0, 2.0, 0.0, 2.0, 2.0, 0.0]),
           "attribute": np.array([0.0, 0.0, 2.0, 2.0, 0.0, 0.0])}
  ok = np.ones(6, bool)
  hard = {"true_valid": ok, "relation_valid": ok, "attribute_valid": ok.copy()}
  hard["attribute_valid"][5] = False
  out = evaluate.twin_accuracy(s_true, twins.__getitem__, hard)
  assert out == {"hn_relation": 50.0, "hn_attribute": 60.0}
  hard["heldout_relation"] = np.array([True, True, True, False, False, False])
  hard["heldout_colour"] = np.array([False, False, True, True, False, True])
  out = evaluate.twin_accuracy(s_true, twins.__getitem__, hard)
  assert out["hn_relation_heldout"] == pytest.approx(200 / 3)
  assert out["hn_relation_seen"] == pytest.approx(100 / 3)
  # Row 5 has no attribute twin: it counts in neither group.
  assert out["hn_attribute_heldout"] == 0.0 and out["hn_attribute_seen"] == 100.0
