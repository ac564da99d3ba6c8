"""Single-stream (fusion) teacher: text tokens cross-attend to image tokens (ALBEF-like).

`FusionTeacher` holds a dual-stream `TwoTower` (its unimodal encoders, which can
be the dual teacher's own, frozen) and a `FusionEncoder` on top: N blocks of
text self-attention + cross-attention to the image tokens. The output at the
[CLS] position is the fused feature f, and a linear ITM head gives the
image-text match logit.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcad_jax.models import layers
from mcad_jax.models.two_tower import TwoTower


class FusionEncoder(nn.Module):
  """Fusion layers over (text tokens, image tokens) -> (f [B, width], itm logit [B])."""

  width: int
  depth: int
  heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, txt_tokens, txt_mask, img_tokens):
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=layers.dense_init, name="txt_in")(txt_tokens)
    ctx = nn.Dense(self.width, dtype=self.dtype, kernel_init=layers.dense_init, name="img_in")(img_tokens)
    x = layers.Encoder(self.depth, self.heads, self.mlp_dim, cross=True, dtype=self.dtype,
                       name="encoder")(x, mask=txt_mask, ctx=ctx)
    f = x[:, 0].astype(jnp.float32)
    itm = nn.Dense(1, kernel_init=layers.dense_init, name="itm_head")(f)[:, 0]
    return f, itm


class FusionTeacher(nn.Module):
  """Unimodal towers + fusion layers. Params: {'dual': TwoTower, 'fusion': FusionEncoder}.

  Attributes:
    dual: keyword arguments of `TwoTower` (its towers give the tokens).
    fusion: keyword arguments of `FusionEncoder`.
    context: which image tokens the text cross-attends to: 'tokens' (the ViT's
      output), 'patches' (its position-embedded patch embeddings) or 'both'.
  """

  dual: dict[str, Any]
  fusion: dict[str, Any]
  context: str = "tokens"

  def setup(self):
    self.towers = TwoTower(**self.dual, name="dual")
    self.fuse = FusionEncoder(**self.fusion, name="fusion")

  def encode_image(self, images):
    """(zimg, aux) with aux['ctx'] the image tokens the fusion layers read."""
    z, aux = self.towers.encode_image(images)
    return z, {**aux, "ctx": image_context(aux, self.context)}

  def encode_text(self, ids):
    return self.towers.encode_text(ids)

  def unimodal(self, images, ids):
    """(zimg, ztxt, aux) of the dual towers, aux holding their tokens (aux['img']['ctx'])."""
    zimg, ztxt, aux = self.towers(images, ids)
    aux["img"] = {**aux["img"], "ctx": image_context(aux["img"], self.context)}
    return zimg, ztxt, aux

  def pair(self, img_tokens, txt_tokens, txt_mask):
    """Fused feature and ITM logit for row-aligned (image, text) pairs."""
    return self.fuse(txt_tokens, txt_mask, img_tokens)

  def __call__(self, images, ids):
    zimg, ztxt, aux = self.unimodal(images, ids)
    f, itm = self.pair(aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"])
    return f, itm, {"zimg": zimg, "ztxt": ztxt, **aux}


CONTEXTS = ("tokens", "patches", "both")


def image_context(img_aux: dict, mode: str) -> jax.Array:
  """The image tokens a fusion layer cross-attends to, from a ViT's aux outputs."""
  if mode == "tokens":
    return img_aux["tokens"]
  if mode == "patches":
    return img_aux["patches"]
  if mode == "both":
    return jnp.concatenate([img_aux["patches"], img_aux["tokens"]], axis=1)
  raise ValueError(f"unknown fusion context {mode!r}; known {CONTEXTS}")
