"""Transformer text tower: token ids in (WordPiece or CLIP BPE), pooled features and tokens out."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcad_jax.models import layers


class TextTransformer(nn.Module):
  """Text encoder over fixed-length ids (pad id 0).

  Default (our own towers): pre-LN, bidirectional, pools position 0 ([CLS]), so
  there is no data-dependent gather (see the tokenizer's policy). Options let
  pretrained towers load exactly (mcad_jax/convert.py):
  - BERT / MiniLM: `post_norm=True` (LayerNorm after each residual and after the
    embeddings), `gelu_exact=True`, `ln_eps=1e-12`, `pool='mean'` (masked mean,
    as sentence-transformers pools MiniLM) or 'cls';
  - CLIP: `causal=True`, `pool='eot'` (the position of the largest id, CLIP's
    end-of-text token), `pad_id` for its padding.

  Attributes:
    vocab_size, max_len: token table and position table sizes.
    width, depth, heads, mlp_dim: transformer size.
    pool: 'cls' (position 0), 'mean' (masked mean), 'eot' (argmax of ids) or 'moments'
      (masked mean of the tokens and their first positional moment, mean(h * (p - mean p))
      with p in [-1, 1] along the sequence, concatenated): word order becomes linear in
      the pooled vector ("A left of B" vs "B left of A"), as the ViT's 'moments' pool does
      for image positions.
    post_norm, gelu_exact, ln_eps, causal: see above.
    pad_id: id of padding (mask = ids != pad_id; CLIP pads with 0 too).
    dtype: compute dtype.
  """

  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "cls"
  post_norm: bool = False
  gelu_exact: bool = False
  ln_eps: float = 1e-6
  causal: bool = False
  pad_id: int = 0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array):
    """Returns (pooled [B, width], {"tokens": [B, L, width], "mask": [B, L]})."""
    if ids.shape[-1] > self.max_len:
      raise ValueError(f"text length {ids.shape[-1]} exceeds max_len {self.max_len}")
    table = self.param("token_embedding", layers.embed_init, (self.vocab_size, self.width))
    pos = self.param("pos_embedding", layers.embed_init, (1, self.max_len, self.width))
    x = layers.embed_lookup(table, ids) + pos[:, : ids.shape[-1]]
    if self.post_norm:
      x = layers.layer_norm("ln_emb", self.dtype, self.ln_eps)(x)
    if layers.in_export_form():  # A select, not a bool->float cast: integer kernels quantize it.
      mask = jnp.where(ids != self.pad_id, jnp.float32(1.0), jnp.float32(0.0))
    else:
      mask = (ids != self.pad_id).astype(jnp.float32)
    x = layers.Encoder(self.depth, self.heads, self.mlp_dim, dtype=self.dtype, post_norm=self.post_norm,
                       gelu_exact=self.gelu_exact, ln_eps=self.ln_eps, name="encoder")(
                           x.astype(self.dtype), mask=None if self.causal else mask, causal=self.causal)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "mean":
      m = mask[..., None].astype(x.dtype)
      pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    elif self.pool == "moments":
      m = mask[..., None].astype(x.dtype)
      n = jnp.maximum(jnp.sum(m, axis=1), 1.0)
      p = jnp.linspace(-1.0, 1.0, ids.shape[-1], dtype=x.dtype)[None, :, None]
      p = p - jnp.sum(p * m, axis=1, keepdims=True) / n[:, None]
      if layers.in_export_form():
        # Both moments as one [B, 2, L] x [B, L, D] matmul: an integer matmul accumulates the
        # products wide, where the element-wise x * m * p, quantized per tensor before its sum,
        # lost the first moment (a small sum of large terms) in static int8.
        w = jnp.stack([mask, (m * p)[..., 0]], axis=1)
        pooled = (jnp.einsum("bkl,bld->bkd", w, x) / n[:, None]).reshape(x.shape[0], -1)
      else:
        pooled = jnp.concatenate([jnp.sum(x * m, axis=1) / n, jnp.sum(x * m * p, axis=1) / n], -1)
    elif self.pool == "eot":
      pooled = jnp.take_along_axis(x, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
    else:
      raise ValueError(f"unknown text pool {self.pool!r}; use 'cls', 'mean', 'eot' or 'moments'")
    return pooled, {"tokens": x, "mask": mask}
