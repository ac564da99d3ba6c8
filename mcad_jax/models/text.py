"""Transformer text tower: WordPiece ids in, [CLS]-pooled features and tokens out."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcad_jax.models import layers


class TextTransformer(nn.Module):
  """BERT-style text encoder over fixed-length ids (pad id 0, [CLS] first).

  Pools position 0 ([CLS]), so there is no data-dependent gather (see the
  tokenizer's policy).

  Attributes:
    vocab_size, max_len: token table and position table sizes.
    width, depth, heads, mlp_dim: transformer size.
    dtype: compute dtype.
  """

  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array):
    """Returns (pooled [B, width], {"tokens": [B, L, width], "mask": [B, L]})."""
    if ids.shape[-1] > self.max_len:
      raise ValueError(f"text length {ids.shape[-1]} exceeds max_len {self.max_len}")
    table = self.param("token_embedding", layers.embed_init, (self.vocab_size, self.width))
    pos = self.param("pos_embedding", layers.embed_init, (1, self.max_len, self.width))
    x = layers.embed_lookup(table, ids) + pos[:, : ids.shape[-1]]
    mask = (ids != 0).astype(jnp.float32)
    x = layers.Encoder(self.depth, self.heads, self.mlp_dim, dtype=self.dtype,
                       name="encoder")(x.astype(self.dtype), mask=mask)
    return x[:, 0], {"tokens": x, "mask": mask}
