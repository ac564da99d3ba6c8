"""Transformer building blocks shared by every tower, written to export cleanly.

Export rules from docs/stack.md, each found by a failed conversion:
- GELU uses the tanh approximation (exact erf adds ~45 TFLite ops per layer and
  its int8 model crashed the interpreter);
- the attention mask is bounded: masked logits get `MASK_FILL` (-30), never
  finfo.min, which broke int8 text models;
- embedding lookups are gathers with `mode="promise_in_bounds"`;
- no shape depends on data, so batch and length stay static.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MASK_FILL = -30.0
Dtype = Any

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def gelu(x, exact: bool = False):
  """tanh GELU by default (exact erf GELU costs ~45 TFLite ops per layer and broke int8);
  `exact` for parity with checkpoints trained with it (BERT, open_clip's non-QuickGELU models)."""
  return jax.nn.gelu(x, approximate=not exact)


_TWO_PASS_LN = contextvars.ContextVar("two_pass_layer_norm", default=False)


@contextlib.contextmanager
def two_pass_layer_norm():
  """Within this context, LayerNorms compute the variance in two passes, mean((x - mean)^2).

  Training uses flax's one-pass E[x^2] - E[x]^2 (about 20% faster per teacher step on CPU:
  benchmarks/layernorm.py). The export traces its encoders in this context: the one-pass
  form cancels catastrophically once activations are int8 (the demo student's int8 text
  encoder: min cosine ~0.95 vs float, 0.997 with two passes; benchmarks/int8_ablation.py).
  Same parameters, and the same function in float up to rounding.
  """
  token = _TWO_PASS_LN.set(True)
  try:
    yield
  finally:
    _TWO_PASS_LN.reset(token)


_EXPORT_FORM = contextvars.ContextVar("export_form", default=False)


@contextlib.contextmanager
def export_form():
  """Within this context, the towers trace the forms the export wants for integer kernels.

  The same function in float up to rounding, with the same parameters; training keeps the
  plain forms. What changes:
  - LayerNorms compute the variance in two passes (`two_pass_layer_norm`);
  - the ViT's 'moments' pool multiplies the tokens by its constant weights with the constant on
    the right: as the left operand of a static int8 BATCH_MATMUL (ai-edge-quantizer), LiteRT
    returned all zeros, and with int16 activations it refused the operand pair;
  - the text tower's 'moments' pool is one matmul of the tokens by the mask and positional
    weights, not element-wise products summed (its first moment was lost in static int8);
  - the text tower's padding mask is a select of 1.0 / 0.0, not a bool->float cast, which no
    quantizer turns integer (it left a float CAST in the static int8 text encoder).
  """
  token = _EXPORT_FORM.set(True)
  try:
    with two_pass_layer_norm():
      yield
  finally:
    _EXPORT_FORM.reset(token)


def in_export_form() -> bool:
  return _EXPORT_FORM.get()


def layer_norm(name: str, dtype: Dtype = jnp.float32, eps: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm; see `two_pass_layer_norm` for how the variance is computed."""
  return nn.LayerNorm(dtype=dtype, epsilon=eps, use_fast_variance=not _TWO_PASS_LN.get(), name=name)


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
               mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
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
    if causal:  # A constant [Lq, Lk] triangle, same bounded fill.
      lq, lk = logits.shape[-2:]
      tri = np.tril(np.ones((lq, lk), np.float32))
      logits = logits + jnp.asarray((1.0 - tri) * MASK_FILL, logits.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=dense_init,
                           name="out")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  gelu_exact: bool = False

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="fc2")(gelu(x, self.gelu_exact))


class Block(nn.Module):
  """Transformer block, pre-LN (default) or post-LN (BERT), optional cross-attention (fusion, BLIP).

  `causal` adds a causal mask (CLIP's text tower); `mask` is the [B, L] key mask.
  """

  heads: int
  mlp_dim: int
  cross: bool = False
  dtype: Dtype = jnp.float32
  post_norm: bool = False
  gelu_exact: bool = False
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, ctx=None, ctx_mask=None, causal: bool = False):
    ln = lambda name: layer_norm(name, self.dtype, self.ln_eps)  # noqa: E731
    attn = Attention(self.heads, self.dtype, name="attn")
    mlp = Mlp(self.mlp_dim, self.dtype, self.gelu_exact, name="mlp")
    if self.post_norm:  # BERT; with `cross`, BLIP's cross-attention after self-attention.
      x = ln("ln1")(x + attn(x, mask=mask, causal=causal))
      if self.cross and ctx is not None:  # Without ctx: BLIP's unimodal text pass, same weights.
        x = ln("lnx")(x + Attention(self.heads, self.dtype, name="xattn")(x, ctx.astype(x.dtype),
                                                                          mask=ctx_mask))
      return ln("ln2")(x + mlp(x))
    x = x + attn(ln("ln1")(x), mask=mask, causal=causal)
    if self.cross:
      x = x + Attention(self.heads, self.dtype, name="xattn")(ln("lnx")(x), ctx, mask=ctx_mask)
    return x + mlp(ln("ln2")(x))


class Encoder(nn.Module):
  """A stack of `depth` blocks, then a final LayerNorm (pre-LN only; post-LN blocks end in one)."""

  depth: int
  heads: int
  mlp_dim: int
  cross: bool = False
  dtype: Dtype = jnp.float32
  post_norm: bool = False
  gelu_exact: bool = False
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, ctx=None, ctx_mask=None, causal: bool = False):
    for i in range(self.depth):
      x = Block(self.heads, self.mlp_dim, self.cross, self.dtype, self.post_norm, self.gelu_exact,
                self.ln_eps, name=f"block{i}")(x, mask, ctx, ctx_mask, causal)
    if self.post_norm:
      return x
    return layer_norm("ln_final", self.dtype, self.ln_eps)(x)
