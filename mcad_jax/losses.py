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
