"""ViT image tower: uint8/float images in, pooled features and tokens out."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcad_jax.models import layers


def _moment_weights(gh: int, gw: int) -> np.ndarray:
  """[3, gh*gw] constants: rows average 1, x and y (patch centres in [-1, 1], row-major)."""
  ys, xs = np.meshgrid((np.arange(gh) + 0.5) / gh * 2 - 1, (np.arange(gw) + 0.5) / gw * 2 - 1,
                       indexing="ij")
  return np.stack([np.ones(gh * gw), xs.reshape(-1), ys.reshape(-1)]).astype(np.float32) / (gh * gw)


class ViT(nn.Module):
  """Vision transformer with in-model preprocessing.

  Images arrive as [B, H, W, 3] in 0..255 (uint8 or float); scaling and
  mean/std normalisation happen here, so exported encoders take raw pixels.

  Attributes:
    width, depth, heads, mlp_dim: transformer size.
    patch: square patch side.
    pool: "gap" (mean of patch tokens), "tok" (a learned [CLS] token) or "moments"
      (the tokens' zeroth and first spatial moments: mean(h), mean(x*h), mean(y*h) with
      x, y the patch centre in [-1, 1], concatenated). Moments make "what is where"
      linear in the pooled vector, so a dual encoder can score "A left of B" as
      x_B - x_A without learning a product of content and position (RESULTS.md,
      "Binding").
    mean, std: per-channel normalisation in 0..1 units.
    ln_pre: a LayerNorm on the embedded tokens before the transformer (CLIP has one).
    gelu_exact, ln_eps: for loading checkpoints trained with exact GELU / another epsilon.
    dtype: compute dtype.
  """

  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  pool: str = "gap"
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)
  ln_pre: bool = False
  gelu_exact: bool = False
  ln_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array):
    """Returns (pooled [B, width], {"tokens": [B, N, width], "patches": [B, N, width]}).

    `patches` are the position-embedded patch embeddings before the transformer:
    local appearance plus position, which a fusion teacher can bind words to.
    """
    b, h, w, _ = images.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"image {h}x{w} is not divisible by patch {self.patch}")
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, kernel_init=layers.dense_init,
                name="embedding")(x.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    pos = self.param("pos_embedding", layers.embed_init, (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    if self.ln_pre:
      x = layers.layer_norm("ln_pre", self.dtype, self.ln_eps)(x)
    patches = x
    x = layers.Encoder(self.depth, self.heads, self.mlp_dim, dtype=self.dtype,
                       gelu_exact=self.gelu_exact, ln_eps=self.ln_eps, name="encoder")(x)
    if self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "tok":
      pooled = x[:, 0]
    elif self.pool == "moments":
      gh, gw = h // self.patch, w // self.patch
      w = jnp.asarray(_moment_weights(gh, gw), x.dtype)
      if layers.in_export_form():  # A plain [B*D, N] x [N, 3] matmul: the constant as weights.
        xt = jnp.swapaxes(x, 1, 2).reshape(b * x.shape[-1], gh * gw)
        pooled = jnp.swapaxes((xt @ w.T).reshape(b, x.shape[-1], 3), 1, 2)
      else:
        pooled = jnp.einsum("bnd,kn->bkd", x, w)
      pooled = pooled.reshape(b, 3 * self.width)
    else:
      raise ValueError(f"unknown pool {self.pool!r}; use 'gap', 'tok' or 'moments'")
    return pooled, {"tokens": x, "patches": patches}
