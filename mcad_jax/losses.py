"""Loss functions: pure, over global arrays (under jit XLA inserts the gathers).

Every function here has a NumPy reference in tests/test_losses.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _xent_diag(logits: jax.Array) -> jax.Array:
  """Mean cross-entropy of each row against its diagonal entry."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.diagonal(logp))


def infonce(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric softmax InfoNCE (CLIP): matched pairs are the diagonal.

  Args:
    zimg: [B, E] image embeddings (unit norm).
    ztxt: [B, E] text embeddings (unit norm).
    scale: scalar logit scale (1 / temperature).
  Returns:
    Scalar: mean of image->text and text->image cross-entropies.
  """
  logits = scale * zimg @ ztxt.T
  return 0.5 * (_xent_diag(logits) + _xent_diag(logits.T))


def sigmoid(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """SigLIP pairwise sigmoid loss, summed over pairs and averaged over images."""
  logits = scale * zimg @ ztxt.T + bias
  labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def contrastive(kind: str, zimg, ztxt, scale, bias) -> jax.Array:
  """Dispatch on the config's `loss` name: 'infonce' or 'sigmoid'."""
  if kind == "infonce":
    return infonce(zimg, ztxt, scale)
  if kind == "sigmoid":
    return sigmoid(zimg, ztxt, scale, bias)
  raise ValueError(f"unknown contrastive loss {kind!r}")


def kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Mean over rows of KL(softmax(teacher) || softmax(student))."""
  lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


def kl_sim(sim_student: jax.Array, sim_teacher: jax.Array, temperature: float,
           tau_squared: bool = True) -> jax.Array:
  """Distribution distillation on a similarity matrix, both directions.

  0.5 * [KL over rows (i->t) + KL over columns (t->i)] of softmax(sim / tau),
  times tau^2 if `tau_squared` (Hinton's scaling, which keeps gradient size
  independent of tau for tau >> 1, but shrinks the term by tau^2 at the small
  temperatures of contrastive models).
  """
  s, t = sim_student / temperature, sim_teacher / temperature
  kl = 0.5 * (kl_rows(t, s) + kl_rows(t.T, s.T))
  return kl * temperature**2 if tau_squared else kl


def feature_l2(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over rows of the squared L2 distance between paired features."""
  return jnp.mean(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1))


def sim_l2(sim_student: jax.Array, sim_teacher: jax.Array) -> jax.Array:
  """Similarity-matrix distance (SD): mean squared difference of all entries."""
  return jnp.mean(jnp.square(sim_student - sim_teacher))


def itm_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Binary cross-entropy of match logits; `weights` (0/1) masks invalid pairs."""
  labels = labels.astype(jnp.float32)
  per = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
  if weights is None:
    return jnp.mean(per)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sample_hard_negatives(sim: jax.Array, rng: jax.Array) -> jax.Array:
  """For each row, an off-diagonal column drawn with probability softmax(sim row) (ALBEF)."""
  masked = jnp.where(jnp.eye(sim.shape[0], dtype=bool), -1e9, sim.astype(jnp.float32))
  return jax.random.categorical(rng, masked, axis=-1)


def candidate_softmax(logits: jax.Array, valid: jax.Array,
                      weights: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of column 0 against the other valid columns of each row.

  Each row scores one query against its own candidate list (the true match in
  column 0, then hard negatives such as relation / attribute twins and mined
  neighbours), so the candidates compete in one softmax instead of being judged
  one at a time (ITM's BCE). Invalid columns take no probability; rows with a
  zero weight, or an invalid column 0, do not count.

  Args:
    logits: [N, C] match scores.
    valid: [N, C] bool.
    weights: [N] row weights (default 1).
  Returns:
    Scalar: weighted mean over counted rows of -log softmax(logits)[:, 0].
  """
  valid = valid.astype(bool)
  masked = jnp.where(valid, logits.astype(jnp.float32), -1e9)
  per = -jax.nn.log_softmax(masked, axis=-1)[:, 0]
  w = valid[:, 0].astype(jnp.float32)
  if weights is not None:
    w = w * weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def gumbel_top_k(scores: jax.Array, rng: jax.Array, k: int) -> jax.Array:
  """[N, k] off-diagonal column indices per row, drawn without replacement with
  probability proportional to softmax(scores row) (Gumbel top-k; ALBEF's mining, k at once)."""
  g = -jnp.log(-jnp.log(jax.random.uniform(rng, scores.shape, minval=1e-9, maxval=1.0)))
  masked = jnp.where(jnp.eye(scores.shape[0], scores.shape[1], dtype=bool), -1e9,
                     scores.astype(jnp.float32) + g)
  return jax.lax.top_k(masked, k)[1]


def kl_candidates(teacher_logits: jax.Array, student_logits: jax.Array, valid: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """KL(softmax(teacher) || softmax(student)) over each row's valid candidate columns.

  The distillation counterpart of `candidate_softmax`: rows are images, columns
  their hard captions (the canonical caption and its twins), scored by both
  models; invalid columns take no probability.

  Args:
    teacher_logits, student_logits: [N, C].
    valid: [N, C] bool; rows with fewer than two valid columns do not count.
    weights: [N] row weights (default 1).
  """
  valid = valid.astype(bool)
  lt = jax.nn.log_softmax(jnp.where(valid, teacher_logits.astype(jnp.float32), -1e9), axis=-1)
  ls = jax.nn.log_softmax(jnp.where(valid, student_logits.astype(jnp.float32), -1e9), axis=-1)
  per = jnp.sum(jnp.where(valid, jnp.exp(lt) * (lt - ls), 0.0), axis=-1)
  w = (jnp.sum(valid, axis=-1) >= 2).astype(jnp.float32)
  if weights is not None:
    w = w * weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def grounding_xent(logits: jax.Array, cells: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of the grid cell of each object a caption names (X-VLM-style grounding).

  X-VLM predicts each phrase's box from the fused [CLS] feature of (image, phrase); on
  `shapes` every object sits in a grid cell, so the box becomes a cell and the loss a
  softmax over cells. Our reading of X-VLM, not its code.

  Args:
    logits: [N, K, C] scores over C cells for the K objects each caption names, in order.
    cells: [N, K] int cell of each named object; -1 where the caption names fewer.
    weights: [N] row weights (default 1).
  Returns:
    Scalar: weighted mean over counted (row, object) pairs of -log softmax(logits)[cell].
  """
  cells = cells.astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(cells, 0)[..., None], axis=-1)[..., 0]
  w = (cells >= 0).astype(jnp.float32)
  if weights is not None:
    w = w * weights.astype(jnp.float32)[:, None]
  return -jnp.sum(picked * w) / jnp.maximum(jnp.sum(w), 1.0)
