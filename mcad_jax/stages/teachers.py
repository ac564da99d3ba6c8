"""Frozen teachers for distillation: their models, their params, their forward passes.

Shared by the distill stage (online teachers) and the teacher-output cache,
which runs the same forward passes once over the training split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from mcad_jax import recipes
from mcad_jax.data import pipeline
from mcad_jax.stages import common
from mcad_jax.stages.common import abstract_params, dual_model, dummy_batch, restore_params, teacher_scale
from mcad_jax.stages.fusion import fusion_model


def teacher_models(config, dcfg):
  """(dual teacher TwoTower, fusion FusionTeacher or None) from the named stages' configs."""
  dual = dual_model(config, config[dcfg.teachers.dual].model)
  fusion = None
  if recipes.needs_fusion(dcfg):
    fusion = fusion_model(config, config[dcfg.teachers.fusion])
  return dual, fusion


def load_teachers(config, dcfg, workdir: str, mesh):
  """Frozen teacher params {'dual': ..., 'fusion': ... or None}, sharded like training state."""
  dual, fusion = teacher_models(config, dcfg)
  img, txt = dummy_batch(config, model_cfg=config[dcfg.teachers.dual].model)
  out = {"dual": restore_params(
      config, workdir, dcfg.teachers.dual,
      abstract_params(lambda r: dual.init(r, img, txt)["params"], mesh, config)), "fusion": None}
  if fusion is not None:
    img, txt = dummy_batch(config, model_cfg=config[dcfg.teachers.fusion].model)
    out["fusion"] = restore_params(
        config, workdir, dcfg.teachers.fusion,
        abstract_params(lambda r: fusion.init(r, img, txt)["params"], mesh, config))
  return out


def fusion_shares_dual_towers(config, dcfg) -> bool:
  """True when the fusion teacher's towers are the dual teacher's, frozen: reuse its tokens."""
  f = config[dcfg.teachers.fusion].fusion
  return bool(f.freeze_towers and f.towers_from == dcfg.teachers.dual)


@dataclasses.dataclass(frozen=True)
class TeacherFns:
  """Frozen-teacher forward passes, split so the cache can encode each image once.

  image(frozen, images) -> (v, fusion image tokens or None)
  text(frozen, ids, fusion_ids=None) -> (t, (fusion text tokens, mask) or None); each teacher
    reads the ids of its own tokenizer (`fusion_ids` None: the same as the dual teacher's)
  fuse(frozen, img_tokens, txt_tokens, txt_mask) -> (f, itm)
  tokenizers: {'dual': tokenizer, 'fusion': tokenizer or None}
  """

  image: Callable
  text: Callable
  fuse: Callable | None
  fusion: Any
  tokenizers: dict = dataclasses.field(default_factory=dict)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The batch fields the online teachers read: their own tokenizers' ids."""
    return self.keys(("text",))

  def keys(self, fields) -> tuple[str, ...]:
    """Batch keys of text `fields` in the ids of each teacher's tokenizer."""
    return tuple(dict.fromkeys(pipeline.ids_key(f, t) for f in fields for t in self.tokenizers.values() if t))

  def key(self, field: str, which: str) -> str | None:
    """Batch key of `field` in teacher `which`'s ('dual' / 'fusion') ids, None without that teacher."""
    t = self.tokenizers.get(which)
    return pipeline.ids_key(field, t) if t is not None else None

  def on_batch(self, frozen, batch):
    """Online outputs for a training batch, each teacher on its own ids."""
    ids = {k: batch[pipeline.ids_key("text", t)] for k, t in self.tokenizers.items() if t}
    return self(frozen, batch["image"], ids["dual"], ids.get("fusion"))

  def __call__(self, frozen, images, ids, fusion_ids=None):
    """Online outputs for row-aligned pairs: {'v', 't', 'scale'} (+ 'f', 'itm', 'tokens')."""
    v, itok = self.image(frozen, images)
    t, ttok = self.text(frozen, ids, fusion_ids)
    out = {"v": v, "t": t, "scale": teacher_scale(frozen)}
    if self.fuse is not None:
      out["f"], out["itm"] = self.fuse(frozen, itok, *ttok)
      out["tokens"] = (itok, *ttok)
    return jax.lax.stop_gradient(out)


def teacher_fns(config, dcfg) -> TeacherFns:
  dual, fusion = teacher_models(config, dcfg)
  with_fusion = fusion is not None and recipes.needs_fusion(dcfg)
  share = with_fusion and fusion_shares_dual_towers(config, dcfg)

  def image(frozen, images):
    v, aux = dual.apply({"params": frozen["dual"]}, images, method=dual.encode_image)
    if not with_fusion:
      return v, None
    if not share:
      _, aux = fusion.apply({"params": frozen["fusion"]}, images, method=fusion.encode_image)
      return v, aux["ctx"]
    # Shared towers: only the fusion teacher's own image tokens (e.g. its conv stem) remain.
    return v, fusion.apply({"params": frozen["fusion"]}, images, aux, method=fusion.context_tokens)

  def text(frozen, ids, fusion_ids=None):
    t, aux = dual.apply({"params": frozen["dual"]}, ids, method=dual.encode_text)
    if not with_fusion:
      return t, None
    if not share:
      fids = ids if fusion_ids is None else fusion_ids
      _, aux = fusion.apply({"params": frozen["fusion"]}, fids, method=fusion.encode_text)
      return t, (aux["tokens"], aux["mask"])
    return t, fusion.apply({"params": frozen["fusion"]}, ids, aux, method=fusion.text_tokens)

  def fuse(frozen, itok, ttok, tmask):
    return fusion.apply({"params": frozen["fusion"]}, itok, ttok, tmask, method=fusion.pair)

  toks = {"dual": common.tokenizer(config, config[dcfg.teachers.dual].model),
          "fusion": common.tokenizer(config, config[dcfg.teachers.fusion].model) if with_fusion else None}
  return TeacherFns(image, text, fuse if with_fusion else None, fusion, toks)
