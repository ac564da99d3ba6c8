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

from mcad_jax import config_lib as cl, curriculum, evaluate, losses
from mcad_jax.data import pipeline, scenes
from mcad_jax.models import fusion as fusion_models, two_tower
from mcad_jax.models.fusion import FusionTeacher
from mcad_jax.stages import common
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, restore_params, teacher_scale, tokenizer

log = logging.getLogger(__name__)


def fusion_model(config, scfg) -> FusionTeacher:
  if scfg.fusion.get("arch", "ours") == "blip":  # BLIP's ITM model (models/blip.py), same interface.
    from mcad_jax.models import blip

    tok = tokenizer(config, scfg.model)
    return blip.build(scfg.model, tok.vocab_size, tok.max_len)
  tower = dual_model(config, scfg.model)
  fk = two_tower.size_kwargs(scfg.fusion.size)
  fk.update(dict(scfg.fusion.get("kw", {})))
  fk["depth"] = scfg.fusion.depth or fk["depth"]
  dual_kw = {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)
             if f.name not in ("parent", "name")}
  return FusionTeacher(dual=dual_kw, fusion={**fk, "dtype": tower.dtype},
                       context=scfg.fusion.context, text_source=scfg.fusion.get("text_source", "tower"),
                       grounding_cells=grounding_cells(config, scfg))


def grounding_cells(config, scfg) -> int:
  """Grid cells the grounding head scores: the `shapes` grid's, when the loss is on; else 0."""
  if scfg.fusion.get("grounding_weight", 0.0) <= 0:
    return 0
  return scenes.grid_cells(config.data.tfds_name)


def fusion_stage(config, scfg, workdir: str, mesh) -> Stage:
  model = fusion_model(config, scfg)
  fcfg = scfg.fusion
  img, txt = dummy_batch(config, model_cfg=scfg.model)
  use_twins = bool(config.data.get("hard_negatives", False)) and fcfg.twin_negatives
  ground_w = fcfg.get("grounding_weight", 0.0)  # config_lib checks it goes with twins and softmax

  def init(rng):
    return model.init(rng, img, txt)["params"]

  pretrained = common.pretrained_init(config, scfg, model)  # e.g. 'blip:PATH' (fusion.arch='blip')

  def load_init(params):
    if pretrained is not None:
      params = pretrained(params)
    if not fcfg.towers_from:
      return params
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params["dual"])
    log.info("Fusion teacher towers from %s.", fcfg.towers_from)
    return {**params, "dual": restore_params(config, workdir, fcfg.towers_from, abstract)}

  def towers(params, batch):
    p = dict(params)
    if fcfg.freeze_towers:
      p["dual"] = jax.lax.stop_gradient(p["dual"])
    zimg, ztxt, aux = model.apply({"params": p}, batch["image"], batch["text"], method=model.unimodal)
    pair = lambda it, tt, tm: model.apply({"params": p}, it, tt, tm, method=model.pair)
    twin_tokens = None
    if use_twins:  # One text-tower pass for the canonical caption and both twins.
      ids = jnp.concatenate([batch["hn_true"], batch["hn_relation"], batch["hn_attribute"]])
      _, taux = model.apply({"params": p}, ids, method=model.encode_text)
      twin_tokens = (taux["tokens"], taux["mask"])
    return zimg, ztxt, aux, pair, twin_tokens, p

  def itm_loss(params, batch, rng, frozen, step=None):
    """ALBEF's ITM: independent BCE on positives, mined negatives and twins."""
    del frozen, step
    zimg, ztxt, aux, fused, twin_tokens, _ = towers(params, batch)
    pair = lambda *a: fused(*a)[1]
    itok, ttok, tmask = aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"]
    sim = jax.lax.stop_gradient(aux["logit_scale"] * zimg @ ztxt.T)
    r1, r2 = jax.random.split(rng)
    neg_t = losses.sample_hard_negatives(sim, r1)        # a hard caption for each image
    neg_i = losses.sample_hard_negatives(sim.T, r2)      # a hard image for each caption
    terms = {}
    b = zimg.shape[0]
    logits = [pair(itok, ttok, tmask), pair(itok, ttok[neg_t], tmask[neg_t]),
              pair(itok[neg_i], ttok, tmask)]
    labels = [jnp.ones(b), jnp.zeros(b), jnp.zeros(b)]
    weights = [jnp.ones(b)] * 3
    if use_twins:
      # The canonical two-object caption is a positive and its twins are negatives, so
      # the only cue that separates them is binding (not caption style).
      toks, masks = jnp.split(twin_tokens[0], 3), jnp.split(twin_tokens[1], 3)
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
    return itm + itc_term(zimg, ztxt, aux, terms), terms

  def softmax_loss(params, batch, rng, frozen, step=None):
    """Candidates compete in one softmax per query (docs/method.md, "The teachers").

    image -> [its caption, k mined captions]; caption -> [its image, k mined images];
    and, on `shapes`, image -> [its canonical caption, relation twin, attribute twin,
    k mined canonical captions of other images], so the twins' scores compete directly.
    Every (image, text) pair of the step goes through the fusion layers in one call.
    With `fusion.grounding_weight` > 0, the fused feature of each image with its canonical
    caption also predicts the grid cells of the two objects it names (X-VLM-style).
    """
    del frozen
    zimg, ztxt, aux, pair, twin_tokens, p = towers(params, batch)
    itok, ttok, tmask = aux["img"]["ctx"], aux["txt"]["tokens"], aux["txt"]["mask"]
    b, k = zimg.shape[0], fcfg.negatives
    sim = jax.lax.stop_gradient(aux["logit_scale"] * zimg @ ztxt.T)
    r1, r2 = jax.random.split(rng)
    neg_t = losses.gumbel_top_k(sim, r1, k)        # [B, k] hard captions of each image
    neg_i = losses.gumbel_top_k(sim.T, r2, k)      # [B, k] hard images of each caption
    rows = jnp.arange(b)[:, None]
    # (image row, text row) pairs; text rows index [batch captions; canonical; rel; attr].
    img_idx = [jnp.concatenate([rows, jnp.broadcast_to(rows, (b, k))], 1),
               neg_i]
    txt_idx = [jnp.concatenate([rows, neg_t], 1), jnp.broadcast_to(rows, (b, k))]
    all_tok, all_mask = ttok, tmask
    weight = jnp.ones(b)
    if use_twins:
      all_tok = jnp.concatenate([ttok, twin_tokens[0]])
      all_mask = jnp.concatenate([tmask, twin_tokens[1]])
      img_idx.append(jnp.broadcast_to(rows, (b, 3 + k)))
      txt_idx.append(jnp.concatenate([rows + b, rows + 2 * b, rows + 3 * b, neg_t + b], 1))
      phase = curriculum.at_step(fcfg.curriculum, 0 if step is None else step)
      weight = (batch["num_objects"] <= phase["max_objects"]).astype(jnp.float32)
    sizes = [x.shape[1] for x in img_idx]
    ii = jnp.concatenate([x.reshape(-1) for x in img_idx])
    tt = jnp.concatenate([x.reshape(-1) for x in txt_idx])
    fused, logits = pair(itok[ii], all_tok[tt], all_mask[tt])
    parts, off = [], 0
    for n in sizes:
      parts.append(logits[off:off + b * n].reshape(b, n))
      off += b * n
    ones = lambda n: jnp.ones((b, n), bool)
    i2t = losses.candidate_softmax(parts[0], ones(1 + k), weight)
    t2i_logits = jnp.concatenate([parts[0][:, :1], parts[1]], 1)
    t2i = losses.candidate_softmax(t2i_logits, ones(1 + k), weight)
    terms = {"loss/i2t_softmax": i2t, "loss/t2i_softmax": t2i,
             "match_acc": jnp.mean(jnp.argmax(parts[0], 1) == 0)}
    loss = 0.5 * (i2t + t2i)
    if use_twins:
      tw = parts[2]
      tv = batch["hn_true_valid"]
      valid = jnp.stack([tv, batch["hn_relation_valid"] & (phase["relation"] > 0),
                         batch["hn_attribute_valid"] & (phase["attribute"] > 0)], 1)
      valid = jnp.concatenate([valid, jnp.broadcast_to(tv[neg_t], (b, k))], 1)
      twin = losses.candidate_softmax(tw, valid, weight)
      terms["loss/twin_softmax"] = twin
      for j, kind in enumerate(("relation", "attribute"), start=1):
        w = (batch[f"hn_{kind}_valid"] & tv).astype(jnp.float32)
        terms[f"twin_acc/{kind}"] = jnp.sum((tw[:, 0] > tw[:, j]) * w) / jnp.maximum(jnp.sum(w), 1.0)
      loss = loss + fcfg.twin_weight * twin
      if ground_w > 0:  # The canonical caption is column 0 of the twin part (offset below).
        f_true = fused[b * (1 + 2 * k):].reshape(b, 3 + k, -1)[:, 0]
        scores = model.apply({"params": p}, f_true, method=model.ground)
        ground = losses.grounding_xent(scores, batch["hn_cells"], tv.astype(jnp.float32) * weight)
        hit = (jnp.argmax(scores, -1) == batch["hn_cells"]) & (batch["hn_cells"] >= 0)
        terms["loss/grounding"] = ground
        terms["ground_acc"] = jnp.sum(hit) / jnp.maximum(jnp.sum(batch["hn_cells"] >= 0), 1)
        loss = loss + ground_w * ground
    return loss + itc_term(zimg, ztxt, aux, terms), terms

  def itc_term(zimg, ztxt, aux, terms):
    if fcfg.freeze_towers or fcfg.itc_weight <= 0:
      return 0.0
    itc = losses.infonce(zimg, ztxt, aux["logit_scale"])
    terms["loss/itc"] = itc
    return fcfg.itc_weight * itc

  loss_fn = {"itm": itm_loss, "softmax": softmax_loss}[fcfg.get("loss", "itm")]

  keys = ("image", "text") + (("hn_true", "hn_true_valid", "hn_relation", "hn_relation_valid",
                               "hn_attribute", "hn_attribute_valid", "num_objects")
                              if use_twins else ()) + (("hn_cells",) if ground_w > 0 else ())
  return Stage(init=init, loss_fn=loss_fn, load_init=load_init, batch_keys=keys,
               tokenizer=tokenizer(config, scfg.model),
               freeze=("^dual/",) if fcfg.freeze_towers else (),
               evaluate=lambda params, mesh: eval_fusion(config, scfg, model, params, mesh))


def eval_fusion(config, scfg, model, params, mesh) -> dict:
  """The fusion teacher ranks: it re-ranks the top-k of its own dual towers with ITM."""
  test = pipeline.eval_set(config.data, tokenizer(config, scfg.model), limit=config.data.eval_limit or None)
  return {scfg.report_as: fusion_metrics(config, scfg, model, params, mesh, test)}


def fusion_metrics(config, scfg, model, params, mesh, test: pipeline.EvalSet) -> dict:
  """Re-ranking retrieval metrics and (with twins) hard-negative accuracy on `test`."""
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

    def twin(kind):
      z_k, t_k, m_k = evaluate.embed_all(towers("txt"), params, test.hard[kind], bs, mesh)
      return score_with(t_k, m_k, np.asarray(z_k))(idx, idx)

    out.update(evaluate.twin_accuracy(s_true, twin, test.hard))
  return out


def validate(config, name: str, s) -> None:
  """Checks this stage kind's own section `s` (named `name`); raises config_lib.ConfigError."""
  f = s.fusion
  try:
    two_tower.size_kwargs(f.size)
  except ValueError as e:
    raise cl.ConfigError(f"{name}.fusion.size", str(e)) from None
  cl.need(f.depth >= 0, f"{name}.fusion.depth", "must be >= 0")
  cl.need(f.get("arch", "ours") in ("ours", "blip"), f"{name}.fusion.arch",
          f"unknown arch {f.get('arch')!r}; known ('ours', 'blip')")
  if f.get("arch", "ours") == "blip":
    cl.need(not f.towers_from, f"{name}.fusion.towers_from", "BLIP has towers of its own: set it to ''")
  cl.need(f.rerank_k >= 1, f"{name}.fusion.rerank_k", "must be >= 1")
  for k in ("itc_weight", "rerank_dual_weight"):
    cl.in_range(f[k], f"{name}.fusion.{k}", 0)
  cl.need(f.context in fusion_models.CONTEXTS, f"{name}.fusion.context",
          f"unknown context {f.context!r}; known {fusion_models.CONTEXTS}")
  cl.need(f.text_source in fusion_models.TEXT_SOURCES, f"{name}.fusion.text_source",
          f"unknown text_source {f.text_source!r}; known {fusion_models.TEXT_SOURCES}")
  cl.need(f.loss in ("itm", "softmax"), f"{name}.fusion.loss",
          f"unknown loss {f.loss!r}; use 'itm' or 'softmax'")
  cl.need(f.negatives >= 1, f"{name}.fusion.negatives", f"must be >= 1, got {f.negatives}")
  cl.need(f.negatives < s.batch_size, f"{name}.fusion.negatives",
          f"must be < batch_size {s.batch_size}, got {f.negatives}")
  try:
    curriculum.validate(f.curriculum)
  except ValueError as e:
    raise cl.ConfigError(f"{name}.fusion.curriculum", str(e)) from None
  if f.curriculum:
    cl.need(config.data.get("hard_negatives", False), f"{name}.fusion.curriculum",
            "a curriculum needs data.hard_negatives (shapes' object counts and twins)")
  cl.in_range(f.get("grounding_weight", 0.0), f"{name}.fusion.grounding_weight", 0)
  if f.get("grounding_weight", 0.0) > 0:
    cl.need(f.loss == "softmax" and f.twin_negatives and config.data.get("hard_negatives", False),
            f"{name}.fusion.grounding_weight", "grounding reads the canonical caption's pair: it needs "
            "fusion.loss='softmax', fusion.twin_negatives and data.hard_negatives (shapes)")
    try:
      scenes.grid_cells(config.data.tfds_name)
    except ValueError as e:
      raise cl.ConfigError(f"{name}.fusion.grounding_weight", str(e)) from None
  if f.towers_from:
    cl.stage_ref(config, name, f"{name}.fusion.towers_from", f.towers_from, "dual")
    cl.need(s.model.to_dict() == config[f.towers_from].model.to_dict(), f"{name}.model",
            f"must equal {f.towers_from}.model, whose towers it reuses")
  else:
    cl.need(not f.freeze_towers, f"{name}.fusion.freeze_towers",
            "frozen towers need fusion.towers_from (else they stay random)")
