"""Dual-stream (CLIP-like) model: an image tower and a text tower in one space."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcad_jax.models import layers
from mcad_jax.models.text import TextTransformer
from mcad_jax.models.vit import ViT


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """Image and text towers with linear heads, L2-normalised outputs and a temperature.

  Attributes:
    image: keyword arguments of `ViT`.
    text: keyword arguments of `TextTransformer`.
    embed_dim: shared embedding width.
    init_temperature: softmax temperature at init (logit scale = 1 / T).
    max_logit_scale: the learned scale is clipped to this.
    init_bias: initial logit bias (used by the sigmoid loss only).
    dtype: compute dtype of both towers.
  """

  image: dict[str, Any]
  text: dict[str, Any]
  embed_dim: int
  init_temperature: float = 0.07
  max_logit_scale: float = 100.0
  init_bias: float = -10.0
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    self.img = ViT(**self.image, dtype=self.dtype)
    self.txt = TextTransformer(**self.text, dtype=self.dtype)
    self.img_head = nn.Dense(self.embed_dim, use_bias=False, kernel_init=layers.dense_init,
                             dtype=self.dtype)
    self.txt_head = nn.Dense(self.embed_dim, use_bias=False, kernel_init=layers.dense_init,
                             dtype=self.dtype)
    self.log_scale = self.param(
        "log_scale", nn.initializers.constant(np.log(1.0 / self.init_temperature)), ())
    self.bias = self.param("bias", nn.initializers.constant(self.init_bias), ())

  def encode_image(self, images):
    """images [B, H, W, 3] in 0..255 -> (zimg [B, E] unit norm, aux)."""
    feat, aux = self.img(images)
    return l2_normalize(self.img_head(feat)), aux

  def encode_text(self, ids):
    """ids [B, L] int32 -> (ztxt [B, E] unit norm, aux)."""
    feat, aux = self.txt(ids)
    return l2_normalize(self.txt_head(feat)), aux

  def __call__(self, images, ids):
    """Returns (zimg, ztxt, aux) with aux holding the towers' outputs and the scale."""
    zimg, iaux = self.encode_image(images)
    ztxt, taux = self.encode_text(ids)
    scale = jnp.minimum(jnp.exp(self.log_scale), self.max_logit_scale)
    return zimg, ztxt, {"img": iaux, "txt": taux, "logit_scale": scale, "logit_bias": self.bias}


# Transformer sizes by name: (width, depth, heads, mlp_dim). `mu` and `nano` are
# CPU-sized for the shapes benchmark; the rest follow the usual ViT ladder.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 2, 256),
    "nano": (128, 4, 4, 512),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}


def size_kwargs(variant: str) -> dict[str, int]:
  """'S/16' -> {width, depth, heads, mlp_dim, patch=16}; 'S' -> without patch."""
  name, _, patch = variant.partition("/")
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r} in {variant!r}; known: {sorted(SIZES)}")
  w, d, h, m = SIZES[name]
  kw = {"width": w, "depth": d, "heads": h, "mlp_dim": m}
  if patch:
    if not patch.isdigit():
      raise ValueError(f"bad patch size in {variant!r}")
    kw["patch"] = int(patch)
  return kw


def build(cfg, vocab_size: int, text_len: int) -> TwoTower:
  """TwoTower from a model ConfigDict (see mcad_jax/config_lib.py: model_config)."""
  if "/" not in cfg.image:
    raise ValueError(f"model.image must be 'SIZE/PATCH' (e.g. 'S/16'), got {cfg.image!r}")
  image = {**size_kwargs(cfg.image), "pool": cfg.pool, "mean": tuple(cfg.mean),
           "std": tuple(cfg.std), **dict(cfg.get("image_kw", {}))}
  text = {**size_kwargs(cfg.text), "vocab_size": vocab_size, "max_len": text_len,
          **dict(cfg.get("text_kw", {}))}
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  return TwoTower(image=image, text=text, embed_dim=cfg.embed_dim,
                  init_temperature=cfg.init_temperature, dtype=dtype)


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


__all__: Sequence[str] = ("TwoTower", "SIZES", "size_kwargs", "build", "param_count", "l2_normalize")
