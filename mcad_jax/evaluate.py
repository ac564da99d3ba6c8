"""Retrieval evaluation: R@1/5/10 both ways, RSUM, and hard-negative accuracy.

Protocol (COCO-5K / Flickr-1K): N test images with 5 captions each.
- image->text: an image is a hit at K if any of its 5 captions ranks in the top K
  of all 5N captions;
- text->image: a caption is a hit at K if its image ranks in the top K of N.
Ties count against the model (a competitor with an equal score outranks).

Encoding runs under jit on global arrays sharded over the mesh; the similarity
and ranking also run on device, a block of images at a time.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mcad_jax import sharding
from mcad_jax.data.pipeline import NUM_EVAL_CAPTIONS, EvalSet

KS = (1, 5, 10)
EncodeFn = Callable[[dict, jax.Array], jax.Array]


def embed_all(encode: EncodeFn, params, data: np.ndarray, batch_size: int, mesh: Mesh):
  """Encodes `data` (identical on every process) in fixed-size sharded batches.

  The last batch is padded so every call has the same shape (one compile).
  Returns the encoder's output (an array or a tuple of arrays) for all rows,
  replicated.
  """
  n = len(data)
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  pad = (-n) % batch_size
  data = np.concatenate([data, np.zeros((pad, *data.shape[1:]), data.dtype)]) if pad else data
  in_sh = sharding.batch_sharding(mesh)
  fn = jax.jit(encode, out_shardings=sharding.replicated(mesh))
  outs = []
  for s in range(0, len(data), batch_size):
    chunk = data[s:s + batch_size]
    x = jax.make_array_from_callback(chunk.shape, in_sh, lambda idx, c=chunk: c[idx])
    outs.append(fn(params, x))
  return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n], *outs)


@jax.jit
def _i2t_ranks(zimg_blk, ztxt, first):
  """Rank of the best true caption for each image of a block."""
  sim = zimg_blk @ ztxt.T                                    # [b, 5N]
  rows = jnp.arange(zimg_blk.shape[0])
  cols = (first + rows)[:, None] * NUM_EVAL_CAPTIONS + jnp.arange(NUM_EVAL_CAPTIONS)
  own = jnp.take_along_axis(sim, cols, axis=1)
  best = jnp.max(own, axis=1, keepdims=True)
  # Other captions scoring >= the best true one; ties go against the model.
  return jnp.sum(sim >= best, axis=1) - jnp.sum(own >= best, axis=1)


@jax.jit
def _t2i_ranks(ztxt_blk, zimg, first):
  """Rank of the true image for each caption of a block."""
  sim = ztxt_blk @ zimg.T                                    # [b, N]
  own = (first + jnp.arange(ztxt_blk.shape[0])) // NUM_EVAL_CAPTIONS
  true = jnp.take_along_axis(sim, own[:, None], axis=1)
  return jnp.sum(sim >= true, axis=1) - 1  # Other images scoring >= the true one.


def _blocked(fn, queries, keys, block):
  ranks = []
  for s in range(0, queries.shape[0], block):
    ranks.append(np.asarray(fn(queries[s:s + block], keys, s)))
  return np.concatenate(ranks)


def recall_metrics(zimg, ztxt, block: int = 1024) -> dict[str, float]:
  """R@1/5/10 (percent) both ways and RSUM from unit-norm embeddings.

  Args:
    zimg: [N, E] image embeddings.
    ztxt: [5N, E] caption embeddings; caption j belongs to image j // 5.
  """
  n = zimg.shape[0]
  if ztxt.shape[0] != NUM_EVAL_CAPTIONS * n:
    raise ValueError(f"need {NUM_EVAL_CAPTIONS} captions per image: {n} images, "
                     f"{ztxt.shape[0]} captions")
  i2t = _blocked(_i2t_ranks, zimg, ztxt, block)
  t2i = _blocked(_t2i_ranks, ztxt, zimg, block * NUM_EVAL_CAPTIONS)
  return _summarise(i2t, t2i)


# Which held-out flag of an eval set (pipeline.eval_set) splits each kind of twin.
HELDOUT_FLAGS = {"relation": "heldout_relation", "attribute": "heldout_colour"}


def twin_accuracy(s_true: np.ndarray, twin_score: Callable[[str], np.ndarray],
                  hard: dict[str, np.ndarray]) -> dict[str, float]:
  """Percent of images whose true caption outscores its relation / attribute twin.

  Args:
    s_true: [N] scores of each image with its canonical caption.
    twin_score: kind -> [N] scores of each image with its twin of that kind.
    hard: the eval set's hard captions and flags. Where it marks held-out compositions (the
      `heldout` dataset), also `hn_<kind>_heldout` and `hn_<kind>_seen`, over the images whose
      canonical caption holds one (or none).
  """
  out = {}
  for kind in ("relation", "attribute"):
    valid = hard[f"{kind}_valid"] & hard["true_valid"]
    if not valid.any():
      continue
    wins = s_true > twin_score(kind)
    out[f"hn_{kind}"] = float(100.0 * np.mean(wins[valid]))
    flag = hard.get(HELDOUT_FLAGS[kind])
    if flag is not None:
      for name, rows in (("heldout", valid & flag), ("seen", valid & ~flag)):
        if rows.any():
          out[f"hn_{kind}_{name}"] = float(100.0 * np.mean(wins[rows]))
  return out


def hard_negative_metrics(zimg, encode_text: Callable[[np.ndarray], jax.Array],
                          hard: dict[str, np.ndarray]) -> dict[str, float]:
  """Percent of images whose true caption outscores its relation / attribute twin."""
  zimg = np.asarray(zimg)
  score = lambda ids: np.sum(zimg * np.asarray(encode_text(ids)), axis=1)
  return twin_accuracy(score(hard["true"]), lambda kind: score(hard[kind]), hard)


def evaluate_dual(encode_image: EncodeFn, encode_text: EncodeFn, params, data: EvalSet,
                  mesh: Mesh, batch_size: int = 512) -> tuple[dict[str, float], jax.Array, jax.Array]:
  """Full retrieval eval of a dual encoder. Returns (metrics, zimg, ztxt)."""
  zimg = embed_all(encode_image, params, data.images, batch_size, mesh)
  ztxt = embed_all(encode_text, params, data.texts, batch_size, mesh)
  metrics = recall_metrics(zimg, ztxt)
  if data.hard is not None:
    metrics.update(hard_negative_metrics(
        zimg, lambda ids: embed_all(encode_text, params, ids, batch_size, mesh), data.hard))
  return metrics, zimg, ztxt


def batched_pairs(pair_fn, params, itok, ttok, tmask, img_idx, txt_idx, batch_size: int,
                  mesh: Mesh | None = None) -> np.ndarray:
  """pair_fn(params, itok[i], ttok[j], tmask[j]) for each (i, j) of the index lists."""
  img_idx, txt_idx = np.asarray(img_idx, np.int32), np.asarray(txt_idx, np.int32)
  n = len(img_idx)
  pad = (-n) % batch_size
  img_idx = np.concatenate([img_idx, np.zeros(pad, np.int32)])
  txt_idx = np.concatenate([txt_idx, np.zeros(pad, np.int32)])
  fn = _pair_scorer(pair_fn)
  out = [np.asarray(fn(params, itok, ttok, tmask, img_idx[s:s + batch_size], txt_idx[s:s + batch_size]))
         for s in range(0, len(img_idx), batch_size)]
  return np.concatenate(out)[:n]


_SCORERS: dict = {}


def _pair_scorer(pair_fn):
  if pair_fn not in _SCORERS:
    _SCORERS[pair_fn] = jax.jit(
        lambda p, it, tt, tm, ii, jj: pair_fn(p, jnp.take(it, ii, axis=0), jnp.take(tt, jj, axis=0),
                                              jnp.take(tm, jj, axis=0)))
  return _SCORERS[pair_fn]


@functools.partial(jax.jit, static_argnums=2)
def _topk(q, keys, k):
  return jax.lax.top_k(q @ keys.T, k)[1]


def _candidates(queries, keys, k, block=1024):
  return np.concatenate([np.asarray(_topk(queries[s:s + block], keys, k))
                         for s in range(0, queries.shape[0], block)])


def rerank_metrics(zimg, ztxt, score, k: int) -> dict[str, float]:
  """R@K after re-ranking each query's top-k dual candidates by `score`.

  Args:
    zimg, ztxt: dual embeddings ([N, E] and [5N, E]) that propose candidates.
    score: (img_idx, txt_idx) -> match scores for those pairs.
    k: candidates per query. A query whose true match is not among them keeps
      its dual rank (>= k).
  """
  n = zimg.shape[0]
  dual_i2t = _blocked(_i2t_ranks, zimg, ztxt, 1024)
  dual_t2i = _blocked(_t2i_ranks, ztxt, zimg, 1024 * NUM_EVAL_CAPTIONS)
  # image -> text
  cand = _candidates(zimg, ztxt, k)                               # [N, k] caption ids
  rows = np.repeat(np.arange(n), k)
  sc = score(rows, cand.reshape(-1)).reshape(n, k)
  own = (cand // NUM_EVAL_CAPTIONS) == np.arange(n)[:, None]
  best = np.where(own, sc, -np.inf).max(axis=1, keepdims=True)
  rr = np.sum((sc >= best) & ~own, axis=1)
  i2t = np.where(own.any(axis=1), rr, np.maximum(dual_i2t, k))
  # text -> image
  cand = _candidates(ztxt, zimg, k)                               # [5N, k] image ids
  rows = np.repeat(np.arange(NUM_EVAL_CAPTIONS * n), k)
  sc = score(cand.reshape(-1), rows).reshape(-1, k)
  own = cand == (np.arange(NUM_EVAL_CAPTIONS * n) // NUM_EVAL_CAPTIONS)[:, None]
  true = np.where(own, sc, -np.inf).max(axis=1, keepdims=True)
  rr = np.sum((sc >= true) & ~own, axis=1)
  t2i = np.where(own.any(axis=1), rr, np.maximum(dual_t2i, k))
  return _summarise(i2t, t2i)


def _summarise(i2t, t2i) -> dict[str, float]:
  out = {}
  for name, ranks in (("i2t", i2t), ("t2i", t2i)):
    for k in KS:
      out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
  out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS))
  return out
