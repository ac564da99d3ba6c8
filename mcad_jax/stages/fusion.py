"""The `fusion` stage kind: the single-stream teacher (ALBEF-like) and its evaluation.

Cross-attention fusion layers on top of (by default frozen) dual towers, trained
on image-text matching; it ranks by re-ranking the dual towers' top-k.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mcad_jax import evaluate, losses
from mcad_jax.data import pipeline
from mcad_jax.models import two_tower
from mcad_jax.models.fusion import FusionTeacher
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, restore_params, teacher_scale, tokenizer

log = logging.getLogger(__name__)


def fusion_model(config, scfg) -> FusionTeacher:
  tower = dual_model(config, scfg.model)
  fk = two_tower.size_kwargs(scfg.fusion.size)
  fk.update(dict(scfg.fusion.get("kw", {})))
  fk["depth"] = scfg.fusion.depth or fk["depth"]
  dual_kw = {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)
             if f.name not in ("parent", "name")}
  return FusionTeacher(dual=dual_kw, fusion={**fk, "dtype": tower.dtype},
                       context=scfg.fusion.context)


def fusion_stage(config, scfg, workdir: str, mesh) -> Stage:
  model = fusion_model(config, scfg)
  fcfg = scfg.fusion
  img, txt = dummy_batch(config)
  use_twins = bool(config.data.get("hard_negatives", False)) and fcfg.twin_negatives

  def init(rng):
    return model.init(rng, img, txt)["params"]

  def load_init(params):
    if not fcfg.towers_from:
      return params
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params["dual"])
    log.info("Fusion teacher towers from %s.", fcfg.towers_from)
    return {**params, "dual": restore_params(config, workdir, fcfg.towers_from, abstract)}

  def loss_fn(params, batch, rng, frozen):
    del frozen
    p = dict(params)
    if fcfg.freeze_towers:
      p["dual"] = jax.lax.stop_gradient(p["dual"])
    zimg, ztxt, aux = model.apply({"params": p}, batch["image"], batch["text"], method=model.unimodal)
    itok, ttok, tmask = aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"]
    sim = jax.lax.stop_gradient(aux["logit_scale"] * zimg @ ztxt.T)
    r1, r2 = jax.random.split(rng)
    neg_t = losses.sample_hard_negatives(sim, r1)        # a hard caption for each image
    neg_i = losses.sample_hard_negatives(sim.T, r2)      # a hard image for each caption
    pair = lambda it, tt, tm: model.apply({"params": p}, it, tt, tm, method=model.pair)[1]
    terms = {}
    b = zimg.shape[0]
    logits = [pair(itok, ttok, tmask), pair(itok, ttok[neg_t], tmask[neg_t]),
              pair(itok[neg_i], ttok, tmask)]
    labels = [jnp.ones(b), jnp.zeros(b), jnp.zeros(b)]
    weights = [jnp.ones(b)] * 3
    if use_twins:
      # The canonical two-object caption is a positive and its twins are negatives, so
      # the only cue that separates them is binding (not caption style).
      # One text-tower pass for the canonical caption and both twins.
      ids = jnp.concatenate([batch["hn_true"], batch["hn_relation"], batch["hn_attribute"]])
      _, taux = model.apply({"params": p}, ids, method=model.encode_text)
      toks, masks = jnp.split(taux["tokens"], 3), jnp.split(taux["mask"], 3)
      true_logit = pair(itok, toks[0], masks[0])
      logits.append(true_logit)
      labels.append(jnp.ones(b))
      weights.append(batch["hn_true_valid"].astype(jnp.float32))
      for k, kind in enumerate(("relation", "attribute"), start=1):
        lg = pair(itok, toks[k], masks[k])
        w = batch[f"hn_{kind}_valid"].astype(jnp.float32) * weights[3]
        logits.append(lg)
        labels.append(jnp.zeros(b))
        weights.append(w)
        terms[f"twin_acc/{kind}"] = jnp.sum((true_logit > lg) * w) / jnp.maximum(jnp.sum(w), 1.0)
    logits, labels, weights = (jnp.concatenate(x) for x in (logits, labels, weights))
    itm = losses.itm_bce(logits, labels, weights)
    terms.update({"loss/itm": itm, "itm_acc": jnp.sum(((logits > 0) == (labels > 0)) * weights)
             / jnp.sum(weights)})
    loss = itm
    if not fcfg.freeze_towers and fcfg.itc_weight > 0:
      itc = losses.infonce(zimg, ztxt, aux["logit_scale"])
      terms["loss/itc"] = itc
      loss = loss + fcfg.itc_weight * itc
    return loss, terms

  keys = ("image", "text") + (("hn_true", "hn_true_valid", "hn_relation", "hn_relation_valid",
                               "hn_attribute", "hn_attribute_valid") if use_twins else ())
  return Stage(init=init, loss_fn=loss_fn, load_init=load_init, batch_keys=keys,
               freeze=("^dual/",) if fcfg.freeze_towers else (),
               evaluate=lambda params, mesh: eval_fusion(config, scfg, model, params, mesh))


def eval_fusion(config, scfg, model, params, mesh) -> dict:
  """The fusion teacher ranks: it re-ranks the top-k of its own dual towers with ITM."""
  test = pipeline.eval_set(config.data, tokenizer(config), limit=config.data.eval_limit or None)
  bs = config.eval_batch_size

  def towers(kind):
    def fn(p, x):
      if kind == "img":
        z, aux = model.apply({"params": p}, x, method=model.encode_image)
        return z, aux["ctx"]
      z, aux = model.apply({"params": p}, x, method=model.encode_text)
      return z, aux["tokens"], aux["mask"]
    return fn

  zimg, itok = evaluate.embed_all(towers("img"), params, test.images, bs, mesh)
  ztxt, ttok, tmask = evaluate.embed_all(towers("txt"), params, test.texts, bs, mesh)
  pair_fn = lambda p, it, tt, tm: model.apply({"params": p}, it, tt, tm, method=model.pair)[1]
  # Re-ranking score: ITM logit + w * the dual logit (w = fusion.rerank_dual_weight).
  w = scfg.fusion.rerank_dual_weight
  scale = float(teacher_scale({"dual": params["dual"]}))
  zi, zt = np.asarray(zimg), np.asarray(ztxt)

  def score_with(ttok_, tmask_, zt_):
    def score(ii, tt):
      ii, tt = np.asarray(ii), np.asarray(tt)
      itm = evaluate.batched_pairs(pair_fn, params, itok, ttok_, tmask_, ii, tt, bs)
      return itm + w * scale * np.sum(zi[ii] * zt_[tt], axis=-1) if w else itm
    return score

  out = evaluate.rerank_metrics(zimg, ztxt, score_with(ttok, tmask, zt), scfg.fusion.rerank_k)
  if test.hard is not None:
    idx = np.arange(test.num_images)
    z_true, t_true, m_true = evaluate.embed_all(towers("txt"), params, test.hard["true"], bs, mesh)
    s_true = score_with(t_true, m_true, np.asarray(z_true))(idx, idx)
    for kind in ("relation", "attribute"):
      valid = test.hard[f"{kind}_valid"] & test.hard["true_valid"]
      if not valid.any():
        continue
      z_k, t_k, m_k = evaluate.embed_all(towers("txt"), params, test.hard[kind], bs, mesh)
      s_k = score_with(t_k, m_k, np.asarray(z_k))(idx, idx)
      out[f"hn_{kind}"] = float(100.0 * np.mean((s_true > s_k)[valid]))
  return {scfg.report_as: out}
