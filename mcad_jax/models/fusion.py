"""Single-stream (fusion) teacher: text tokens cross-attend to image tokens (ALBEF-like).

`FusionTeacher` holds a dual-stream `TwoTower` (its unimodal encoders, which can
be the dual teacher's own, frozen) and a `FusionEncoder` on top: N blocks of
text self-attention + cross-attention to the image tokens. The output at the
[CLS] position is the fused feature f, and a linear ITM head gives the
image-text match logit.

Where the tokens come from is configurable, because it decides whether the
teacher can learn binding ("which colour is where"; docs/method.md):
- image (`context`): the ViT's output `tokens`, its position-embedded `patches`,
  `both`, or `conv`: the fusion teacher's own small conv stem on RGB plus x/y
  coordinate channels (CoordConv), pooled to the patch grid, with learned 2D
  (row + column) position embeddings;
- text (`text_source`): the dual text tower's output `tower` tokens, or `embed`:
  the tower's (frozen) word embeddings plus the fusion teacher's own positions,
  so the fusion layers see word order directly (as BLIP's fusion starts from
  word embeddings).

With `grounding_cells` > 0 a grounding head reads the fused feature f and scores,
for each of the two objects a caption names, which grid cell it sits in
(X-VLM-style dense supervision: `losses.grounding_xent`).
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


class ConvStem(nn.Module):
  """CoordConv stem: uint8 pixels -> [B, (H/16)*(W/16), width] tokens with 2D positions.

  Convs 4x4/4, 3x3/2, 3x3/2 (16x down, so one token per 16 px cell, like a /16
  ViT's grid) on RGB plus two coordinate channels in [-1, 1]; the coordinates let
  every filter know where it is (Liu et al. 2018), which plain convs and linear
  patches learn slowly or not at all (docs/method.md, "The teachers").
  """

  width: int
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.5, 0.5, 0.5)
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    b, h, w, _ = images.shape
    if h % 16 or w % 16:
      raise ValueError(f"conv stem needs image sides divisible by 16, got {h}x{w}")
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([xs, ys], -1), (b, h, w, 2))
    x = jnp.concatenate([x, coords], -1).astype(self.dtype)
    for i, (k, s) in enumerate(((4, 4), (3, 2), (3, 2))):
      x = nn.Conv(self.width, (k, k), strides=(s, s), padding="VALID" if s == k else "SAME",
                  dtype=self.dtype, kernel_init=layers.dense_init, name=f"conv{i}")(x)
      x = layers.gelu(x)
    gh, gw = h // 16, w // 16
    row = self.param("row_embedding", layers.embed_init, (gh, 1, self.width))
    col = self.param("col_embedding", layers.embed_init, (1, gw, self.width))
    x = x + (row + col).astype(x.dtype)
    return x.reshape(b, gh * gw, self.width)


class FusionTeacher(nn.Module):
  """Unimodal towers + fusion layers. Params: {'dual': TwoTower, 'fusion': FusionEncoder}.

  Attributes:
    dual: keyword arguments of `TwoTower` (its towers give the tokens).
    fusion: keyword arguments of `FusionEncoder`.
    context: which image tokens the text cross-attends to: 'tokens' (the ViT's
      output), 'patches' (its position-embedded patch embeddings), 'both', or
      'conv' (this model's own CoordConv stem, `ConvStem`).
    text_source: 'tower' (the text tower's output tokens) or 'embed' (its word
      embeddings plus this model's own position embeddings).
    grounding_cells: grid cells the grounding head scores (0 = no head).
  """

  dual: dict[str, Any]
  fusion: dict[str, Any]
  context: str = "tokens"
  text_source: str = "tower"
  grounding_cells: int = 0

  def setup(self):
    self.towers = TwoTower(**self.dual, name="dual")
    self.fuse = FusionEncoder(**self.fusion, name="fusion")
    if self.context == "conv":
      img = self.dual["image"]
      self.stem = ConvStem(self.fusion["width"], tuple(img.get("mean", (0.5,) * 3)),
                           tuple(img.get("std", (0.5,) * 3)), self.fusion.get("dtype", jnp.float32),
                           name="stem")
    if self.text_source == "embed":
      self.txt_pos = self.param("txt_pos_embedding", layers.embed_init,
                                (1, self.dual["text"]["max_len"], self.fusion["width"]))
    if self.grounding_cells:
      self.ground_head = nn.Dense(GROUNDED_OBJECTS * self.grounding_cells,
                                  kernel_init=layers.dense_init, name="ground_head")

  def context_tokens(self, images, img_aux):
    """The image tokens the fusion layers read, given the image tower's aux outputs."""
    if self.context == "conv":
      return self.stem(images)
    return image_context(img_aux, self.context)

  def text_tokens(self, ids, txt_aux):
    """(tokens, mask) the fusion layers read, given the text tower's aux outputs."""
    if self.text_source == "tower":
      return txt_aux["tokens"], txt_aux["mask"]
    if self.text_source == "embed":
      table = self.towers.txt.variables["params"]["token_embedding"]
      x = layers.embed_lookup(table, ids)
      return x + self.txt_pos[:, : ids.shape[-1]].astype(x.dtype), txt_aux["mask"]
    raise ValueError(f"unknown fusion text_source {self.text_source!r}; use 'tower' or 'embed'")

  def encode_image(self, images):
    """(zimg, aux) with aux['ctx'] the image tokens the fusion layers read."""
    z, aux = self.towers.encode_image(images)
    return z, {**aux, "ctx": self.context_tokens(images, aux)}

  def encode_text(self, ids):
    """(ztxt, aux) with aux['tokens'], aux['mask'] the text tokens the fusion layers read."""
    z, aux = self.towers.encode_text(ids)
    toks, mask = self.text_tokens(ids, aux)
    return z, {**aux, "tokens": toks, "mask": mask}

  def unimodal(self, images, ids):
    """(zimg, ztxt, aux) of the dual towers, aux holding the fusion inputs (aux['img']['ctx'],
    aux['txt']['tokens'])."""
    zimg, ztxt, aux = self.towers(images, ids)
    aux["img"] = {**aux["img"], "ctx": self.context_tokens(images, aux["img"])}
    toks, mask = self.text_tokens(ids, aux["txt"])
    aux["txt"] = {**aux["txt"], "tokens": toks, "mask": mask}
    return zimg, ztxt, aux

  def pair(self, img_tokens, txt_tokens, txt_mask):
    """Fused feature and ITM logit for row-aligned (image, text) pairs."""
    return self.fuse(txt_tokens, txt_mask, img_tokens)

  def ground(self, f):
    """[B, GROUNDED_OBJECTS, grounding_cells] cell scores of the objects a caption names."""
    return self.ground_head(f).reshape(f.shape[0], GROUNDED_OBJECTS, self.grounding_cells)

  def __call__(self, images, ids):
    zimg, ztxt, aux = self.unimodal(images, ids)
    f, itm = self.pair(aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"])
    if self.grounding_cells:  # So that init creates the head's parameters.
      aux["ground"] = self.ground(f)
    return f, itm, {"zimg": zimg, "ztxt": ztxt, **aux}


CONTEXTS = ("tokens", "patches", "both", "conv")
# The canonical caption of a `shapes` scene names two objects (data/scenes.py, hard_negatives).
GROUNDED_OBJECTS = 2
TEXT_SOURCES = ("tower", "embed")


def image_context(img_aux: dict, mode: str) -> jax.Array:
  """The image tokens a fusion layer cross-attends to, from a ViT's aux outputs."""
  if mode == "tokens":
    return img_aux["tokens"]
  if mode == "patches":
    return img_aux["patches"]
  if mode == "both":
    return jnp.concatenate([img_aux["patches"], img_aux["tokens"]], axis=1)
  raise ValueError(f"unknown fusion context {mode!r}; known {CONTEXTS[:3]} (and 'conv', "
                   "which FusionTeacher.context_tokens computes from pixels)")
