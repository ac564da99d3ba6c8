"""BLIP's image-text matching model (single-stream teacher) in linen, with `FusionTeacher`'s interface.

BLIP (`transformers`' `BlipForImageTextRetrieval`): a ViT, and one BERT text
encoder used twice: text only for contrastive retrieval (ITC: `text_proj` of its
[CLS]), and with cross-attention to the image tokens in every layer for matching
(ITM: `itm_head` on the fused [CLS]). Same methods as `FusionTeacher`
(`encode_image`, `encode_text`, `unimodal`, `pair`), so the fusion stage, MCAD
distillation, the teacher cache and re-ranking use it unchanged:

- the text "tokens" handed to `pair` are the text encoder's embedding output
  (word + position, LayerNorm), since BLIP's fusion starts from the word
  embeddings and runs every layer again with cross-attention;
- the image context is the ViT's output tokens after its final LayerNorm;
- f is the fused [CLS] feature; the ITM logit is the 'match' logit minus the
  'no-match' logit of BLIP's two-way head (so sigmoid(itm) is its match probability).

Params: {'dual': {'img', 'txt', 'img_head', 'txt_head', 'log_scale'}, 'fusion': {'itm_head'}};
the text encoder's cross-attention weights live in 'dual/txt' with the rest of the encoder.
Weights convert from a BLIP checkpoint with `mcad_jax.convert.blip_model`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mcad_jax.models import layers
from mcad_jax.models.two_tower import l2_normalize
from mcad_jax.models.vit import ViT


class BlipText(nn.Module):
  """BLIP's BERT text encoder: `embed` ids, then `encode` (with `ctx`: cross-attending)."""

  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  ln_eps: float = 1e-12
  gelu_exact: bool = True
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    self.token_embedding = self.param("token_embedding", layers.embed_init, (self.vocab_size, self.width))
    self.pos_embedding = self.param("pos_embedding", layers.embed_init, (1, self.max_len, self.width))
    self.ln_emb = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)
    # Post-LN BERT layers with cross-attention to the image after self-attention (used only when
    # `encode` is given a context).
    self.blocks = [layers.Block(self.heads, self.mlp_dim, cross=True, dtype=self.dtype, post_norm=True,
                                gelu_exact=self.gelu_exact, ln_eps=self.ln_eps)
                   for _ in range(self.depth)]

  def embed(self, ids):
    """(embedded tokens [B, L, width], mask [B, L]) of ids [B, L] (pad id 0)."""
    if ids.shape[-1] > self.max_len:
      raise ValueError(f"text length {ids.shape[-1]} exceeds max_len {self.max_len}")
    x = layers.embed_lookup(self.token_embedding, ids) + self.pos_embedding[:, : ids.shape[-1]]
    return self.ln_emb(x).astype(self.dtype), (ids != 0).astype(jnp.float32)

  def encode(self, x, mask, ctx=None):
    for blk in self.blocks:
      x = blk(x, mask, ctx)
    return x


class BlipTowers(nn.Module):
  """The unimodal side of BLIP: ViT + text encoder, ITC projections (with bias) and a temperature."""

  image: dict[str, Any]
  text: dict[str, Any]
  embed_dim: int
  init_temperature: float = 0.07
  max_logit_scale: float = 100.0
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    self.img = ViT(**self.image, dtype=self.dtype)
    self.txt = BlipText(**self.text, dtype=self.dtype)
    self.img_head = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.txt_head = nn.Dense(self.embed_dim, dtype=self.dtype)
    # BLIP's ITC temperature (HF's retrieval model carries none; the converter sets it).
    self.log_scale = self.param(
        "log_scale", nn.initializers.constant(np.log(1.0 / self.init_temperature)), ())

  def encode_image(self, images):
    feat, aux = self.img(images)
    return l2_normalize(self.img_head(feat)), aux

  def encode_text(self, ids):
    """(ztxt, {'tokens': embedded ids, 'mask'}) — the tokens are where ITM starts from."""
    x, mask = self.txt.embed(ids)
    h = self.txt.encode(x, mask)
    return l2_normalize(self.txt_head(h[:, 0])), {"tokens": x, "mask": mask, "hidden": h}

  def fuse(self, img_tokens, txt_tokens, txt_mask):
    return self.txt.encode(txt_tokens, txt_mask, img_tokens)

  def scale(self):
    return jnp.minimum(jnp.exp(self.log_scale), self.max_logit_scale)


class BlipItm(nn.Module):
  @nn.compact
  def __call__(self, f):
    return nn.Dense(2, name="itm_head")(f)


class BlipTeacher(nn.Module):
  """BLIP as a single-stream teacher, with `FusionTeacher`'s methods.

  Attributes:
    image: `ViT` kwargs (pool='tok', exact GELU, eps 1e-5: `convert.blip_model_kwargs`).
    text: `BlipText` kwargs.
    embed_dim: ITC width (BLIP's image_text_hidden_size).
    context: always 'tokens' (the ViT's output), for callers that ask.
  """

  image: dict[str, Any]
  text: dict[str, Any]
  embed_dim: int
  init_temperature: float = 0.07
  dtype: layers.Dtype = jnp.float32
  context: str = "tokens"

  def setup(self):
    self.towers = BlipTowers(self.image, self.text, self.embed_dim, self.init_temperature,
                             dtype=self.dtype, name="dual")
    self.itm = BlipItm(name="fusion")

  def encode_image(self, images):
    z, aux = self.towers.encode_image(images)
    return z, {**aux, "ctx": aux["tokens"]}

  def encode_text(self, ids):
    return self.towers.encode_text(ids)

  def unimodal(self, images, ids):
    zimg, iaux = self.encode_image(images)
    ztxt, taux = self.encode_text(ids)
    scale = self.towers.scale()
    return zimg, ztxt, {"img": iaux, "txt": taux, "logit_scale": scale, "logit_bias": jnp.zeros(())}

  def pair(self, img_tokens, txt_tokens, txt_mask):
    """(fused [CLS] feature f, ITM logit = match - no-match) for row-aligned pairs."""
    f = self.towers.fuse(img_tokens, txt_tokens, txt_mask)[:, 0].astype(jnp.float32)
    logits = self.itm(f)
    return f, logits[:, 1] - logits[:, 0]

  def __call__(self, images, ids):
    zimg, ztxt, aux = self.unimodal(images, ids)
    f, itm = self.pair(aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"])
    return f, itm, {"zimg": zimg, "ztxt": ztxt, **aux}


def build(model_cfg, vocab_size: int, text_len: int) -> BlipTeacher:
  """A BlipTeacher from a model config (as `two_tower.build`: sizes, then image_kw / text_kw)."""
  from mcad_jax.models import two_tower

  image = {**two_tower.size_kwargs(model_cfg.image), "pool": "tok", "mean": tuple(model_cfg.mean),
           "std": tuple(model_cfg.std), "gelu_exact": True, "ln_eps": 1e-5,
           **dict(model_cfg.get("image_kw", {}))}
  text = {**two_tower.size_kwargs(model_cfg.text), "vocab_size": vocab_size, "max_len": text_len,
          **dict(model_cfg.get("text_kw", {}))}
  text.pop("patch", None)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.dtype]
  return BlipTeacher(image=image, text=text, embed_dim=model_cfg.embed_dim,
                     init_temperature=model_cfg.init_temperature, dtype=dtype)


__all__ = ("BlipTeacher", "build")
