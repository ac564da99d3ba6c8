"""Transformer building blocks shared by every tower, written to export cleanly.

Export rules from DESIGN §5, each found by a failed conversion:
- GELU uses the tanh approximation (exact erf adds ~45 TFLite ops per layer and
  its int8 model crashed the interpreter);
- the attention mask is bounded: masked logits get `MASK_FILL` (-30), never
  finfo.min, which broke int8 text models;
- embedding lookups are gathers with `mode="promise_in_bounds"`;
- no shape depends on data, so batch and length stay static.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_FILL = -30.0
Dtype = Any

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def gelu(x):
  return jax.nn.gelu(x, approximate=True)


def layer_norm(name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm with the two-pass variance mean((x - mean)^2).

  Flax's default one-pass E[x^2] - E[x]^2 cancels catastrophically once
  activations are int8: it took full-integer TFLite encoders from cosine ~0.999
  to ~0.9 vs float. The parameters are the same either way.
  """
  return nn.LayerNorm(dtype=dtype, use_fast_variance=False, name=name)


def embed_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows of `table` at `ids`; ids are promised in range (the tokenizer's job)."""
  return table.at[ids].get(mode="promise_in_bounds")


class Attention(nn.Module):
  """Multi-head attention with a bounded additive mask.

  Attributes:
    heads: number of heads; must divide the query width.
    dtype: compute dtype.
  """

  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """x: [B, Lq, D]; kv: [B, Lk, Dk] (defaults to x); mask: [B, Lk] of {0, 1}."""
    kv = x if kv is None else kv
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads={self.heads}")
    hd = d // self.heads
    proj = lambda name, y: nn.DenseGeneral(  # noqa: E731
        (self.heads, hd), dtype=self.dtype, kernel_init=dense_init, name=name)(y)
    q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(self.dtype)
    if mask is not None:
      # Multiplicative form of a bounded fill: (1 - m) * -30, no select op.
      logits = logits + (1.0 - mask[:, None, None, :].astype(logits.dtype)) * MASK_FILL
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=dense_init,
                           name="out")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="fc2")(gelu(x))


class Block(nn.Module):
  """Pre-LN transformer block, with optional cross-attention (fusion layers)."""

  heads: int
  mlp_dim: int
  cross: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, ctx=None, ctx_mask=None):
    ln = lambda name: layer_norm(name, self.dtype)  # noqa: E731
    x = x + Attention(self.heads, self.dtype, name="attn")(ln("ln1")(x), mask=mask)
    if self.cross:
      x = x + Attention(self.heads, self.dtype, name="xattn")(ln("lnx")(x), ctx, mask=ctx_mask)
    return x + Mlp(self.mlp_dim, self.dtype, name="mlp")(ln("ln2")(x))


class Encoder(nn.Module):
  """A stack of `depth` blocks followed by a final LayerNorm."""

  depth: int
  heads: int
  mlp_dim: int
  cross: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, ctx=None, ctx_mask=None):
    for i in range(self.depth):
      x = Block(self.heads, self.mlp_dim, self.cross, self.dtype, name=f"block{i}")(
          x, mask, ctx, ctx_mask)
    return layer_norm("ln_final", self.dtype)(x)
