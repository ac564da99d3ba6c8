"""What each kind of stage trains: its init, loss, frozen inputs and evaluation.

The train loop (`train.py`) is the same for every stage; a `Stage` tells it
what differs. Kinds:
- `dual`: a two-tower model on a contrastive loss (the dual teacher, or a
  student trained alone);
- `fusion`: the single-stream teacher, ITM on positives and mined hard
  negatives, on top of (by default frozen) dual towers;
- `distill`: a student trained from frozen teachers by a recipe (distill.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcad_jax import checkpoint, evaluate, losses
from mcad_jax.data import pipeline
from mcad_jax.data.tokenizer import Tokenizer
from mcad_jax.models import two_tower
from mcad_jax.models.fusion import FusionTeacher, image_context

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
  """Everything the train loop needs to know about one stage.

  Attributes:
    init: rng -> params (pure; jitted with sharded outputs).
    loss_fn: (params, batch, rng, frozen) -> (loss, {name: scalar}).
    evaluate: (params, mesh) -> {results row name: metrics}.
    frozen: arrays every step reads but never updates (teacher params), or None.
    load_init: host-side params -> params, run once after a fresh init (e.g. to
      copy in the dual towers), or None.
    update_mask: (step, params) -> pytree of 0/1 multipliers on the updates, or None.
    batch_keys: which batch fields the loss reads.
    host_fn: numpy batch -> numpy batch, run on the host before sharding (e.g. the
      teacher-output cache lookup), or None.
    freeze: regexes of param paths the optimizer must leave alone (no update, no decay),
      on top of the config's `freeze`.
  """

  init: Callable[[jax.Array], Any]
  loss_fn: Callable
  evaluate: Callable
  frozen: Any = None
  load_init: Callable | None = None
  update_mask: Callable | None = None
  batch_keys: tuple[str, ...] = ("image", "text")
  host_fn: Callable | None = None
  freeze: tuple[str, ...] = ()


def tokenizer(config) -> Tokenizer:
  from mcad_jax.data import tokenizer as tokenizers

  return tokenizers.make(config.data.get("tokenizer", "wordpiece"), config.data.text_len)


def dual_model(config, model_cfg) -> two_tower.TwoTower:
  return two_tower.build(model_cfg, tokenizer(config).vocab_size, config.data.text_len)


def dummy_batch(config, n: int = 1):
  s, L = config.data.image_size, config.data.text_len
  return jnp.zeros((n, s, s, 3), jnp.uint8), jnp.zeros((n, L), jnp.int32)


def checkpoint_dir(config, workdir: str, ref: str) -> str:
  """A stage name -> its checkpoint dir: its given `weights`, else its dir in the workdir."""
  return config[ref].get("weights") or os.path.join(workdir, ref, "checkpoints")


def restore_params(config, workdir: str, ref: str, abstract_params):
  """Params of stage/dir `ref`, laid out like `abstract_params` (sharded structs)."""
  return checkpoint.load_params(checkpoint_dir(config, workdir, ref), abstract_params)


def abstract_params(init, mesh, config, rng=None):
  from mcad_jax import sharding

  shapes = jax.eval_shape(init, jax.random.key(0) if rng is None else rng)
  shard = sharding.tree_shardings(shapes, mesh, config.sharding_rules, config.shard_min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shard)


def encoders(model) -> tuple[Callable, Callable]:
  enc_img = lambda p, x: model.apply({"params": p}, x, method=model.encode_image)[0]
  enc_txt = lambda p, x: model.apply({"params": p}, x, method=model.encode_text)[0]
  return enc_img, enc_txt


def pretrained_init(config, scfg, model, under: str | None = None) -> Callable | None:
  """load_init that copies `scfg.pretrained` weights (mcad_jax/convert.py) into a fresh init.

  `under` names the subtree holding the two-tower model (the distill stage's 'student').
  """
  spec = scfg.get("pretrained", "")
  if not spec:
    return None

  def load(params):
    from mcad_jax import convert

    name, new = convert.load_pretrained(spec, config.data.text_len, model.text["heads"])
    log.info("Stage params %s from pretrained %s.", name or "(all)", spec)
    if under:
      return {**params, under: convert.graft(params[under], name, new)}
    return convert.graft(params, name, new)

  return load


def eval_dual(config, model, params, mesh, row: str) -> dict:
  test = pipeline.eval_set(config.data, tokenizer(config), limit=config.data.eval_limit or None)
  enc_img, enc_txt = encoders(model)
  out, _, _ = evaluate.evaluate_dual(enc_img, enc_txt, params, test, mesh,
                                     batch_size=config.eval_batch_size)
  return {row: out}


# ----------------------------------------------------------------------------- dual


def dual_stage(config, scfg, workdir: str, mesh) -> Stage:
  del workdir
  model = dual_model(config, scfg.model)
  img, txt = dummy_batch(config)

  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["text"])
    loss = losses.contrastive(scfg.loss, zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
    return loss, {f"loss/{scfg.loss}": loss, "logit_scale": aux["logit_scale"]}

  return Stage(
      init=lambda rng: model.init(rng, img, txt)["params"],
      loss_fn=loss_fn,
      load_init=pretrained_init(config, scfg, model),
      evaluate=lambda params, mesh: eval_dual(config, model, params, mesh, scfg.report_as))


# ----------------------------------------------------------------------------- fusion


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


# ----------------------------------------------------------------------------- distill


def teacher_models(config, dcfg):
  """(dual teacher TwoTower, fusion FusionTeacher or None) from the named stages' configs."""
  from mcad_jax import distill

  dual = dual_model(config, config[dcfg.teachers.dual].model)
  fusion = None
  if distill.needs_fusion(dcfg):
    fusion = fusion_model(config, config[dcfg.teachers.fusion])
  return dual, fusion


def load_teachers(config, dcfg, workdir: str, mesh):
  """Frozen teacher params {'dual': ..., 'fusion': ... or None}, sharded like training state."""
  dual, fusion = teacher_models(config, dcfg)
  img, txt = dummy_batch(config)
  out = {"dual": restore_params(
      config, workdir, dcfg.teachers.dual,
      abstract_params(lambda r: dual.init(r, img, txt)["params"], mesh, config)), "fusion": None}
  if fusion is not None:
    out["fusion"] = restore_params(
        config, workdir, dcfg.teachers.fusion,
        abstract_params(lambda r: fusion.init(r, img, txt)["params"], mesh, config))
  return out


def fusion_shares_dual_towers(config, dcfg) -> bool:
  """True when the fusion teacher's towers are the dual teacher's, frozen: reuse its tokens."""
  f = config[dcfg.teachers.fusion].fusion
  return bool(f.freeze_towers and f.towers_from == dcfg.teachers.dual)


def teacher_scale(frozen):
  """The dual teacher's logit scale, clipped as TwoTower clips it."""
  return jnp.minimum(jnp.exp(frozen["dual"]["log_scale"]), two_tower.TwoTower.max_logit_scale)


@dataclasses.dataclass(frozen=True)
class TeacherFns:
  """Frozen-teacher forward passes, split so the cache can encode each image once.

  image(frozen, images) -> (v, fusion image tokens or None)
  text(frozen, ids) -> (t, (fusion text tokens, mask) or None)
  fuse(frozen, img_tokens, txt_tokens, txt_mask) -> (f, itm)
  """

  image: Callable
  text: Callable
  fuse: Callable | None
  fusion: Any

  def __call__(self, frozen, images, ids):
    """Online outputs for row-aligned pairs: {'v', 't', 'scale'} (+ 'f', 'itm', 'tokens')."""
    v, itok = self.image(frozen, images)
    t, ttok = self.text(frozen, ids)
    out = {"v": v, "t": t, "scale": teacher_scale(frozen)}
    if self.fuse is not None:
      out["f"], out["itm"] = self.fuse(frozen, itok, *ttok)
      out["tokens"] = (itok, *ttok)
    return jax.lax.stop_gradient(out)


def teacher_fns(config, dcfg) -> TeacherFns:
  from mcad_jax import distill

  dual, fusion = teacher_models(config, dcfg)
  with_fusion = fusion is not None and distill.needs_fusion(dcfg)
  share = with_fusion and fusion_shares_dual_towers(config, dcfg)

  def image(frozen, images):
    v, aux = dual.apply({"params": frozen["dual"]}, images, method=dual.encode_image)
    if not with_fusion:
      return v, None
    if not share:
      _, aux = fusion.apply({"params": frozen["fusion"]}, images, method=fusion.encode_image)
    return v, image_context(aux, fusion.context)

  def text(frozen, ids):
    t, aux = dual.apply({"params": frozen["dual"]}, ids, method=dual.encode_text)
    if not with_fusion:
      return t, None
    if not share:
      _, aux = fusion.apply({"params": frozen["fusion"]}, ids, method=fusion.encode_text)
    return t, (aux["tokens"], aux["mask"])

  def fuse(frozen, itok, ttok, tmask):
    return fusion.apply({"params": frozen["fusion"]}, itok, ttok, tmask, method=fusion.pair)

  return TeacherFns(image, text, fuse if with_fusion else None, fusion)


def distill_stage(config, scfg, workdir: str, mesh) -> Stage:
  from mcad_jax import distill, teacher_cache

  dcfg = scfg
  table = distill.edge_table(dcfg)
  student = dual_model(config, scfg.model)
  img, txt = dummy_batch(config)
  frozen = load_teachers(config, dcfg, workdir, mesh) if distill.uses_teacher(dcfg) else None
  mcad = dcfg.recipe == "mcad"
  t_dim, f_dim = (distill.teacher_dims(frozen["dual"], frozen["fusion"]) if frozen is not None
                  else (scfg.model.embed_dim, 0))
  heads = distill.DistillHeads(t_dim, f_dim if mcad else 0, dcfg.mcad.combine)
  fwd = teacher_fns(config, dcfg) if frozen is not None else None
  cache = None
  if frozen is not None and dcfg.cache:
    cache = teacher_cache.TeacherCache.build(config, frozen, fwd, mesh)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    s = student.init(r1, img, txt)["params"]
    e = scfg.model.embed_dim
    h = heads.init(r2, jnp.zeros((1, e)), jnp.zeros((1, e)), jnp.zeros((1, t_dim)),
                   jnp.zeros((1, t_dim)), jnp.zeros((1, max(f_dim, 1))))["params"]
    return {"student": s, "heads": h}

  def loss_fn(params, batch, rng, frozen):
    del rng
    si, st, saux = student.apply({"params": params["student"]}, batch["image"], batch["text"])
    terms = {"logit_scale": saux["logit_scale"]}
    if frozen is None:
      nodes = distill.Nodes({"si": si, "st": st}, {})
      loss, t = distill.graph_loss(nodes, table, saux["logit_scale"], dcfg.kl_temperature or 0.05,
                                   dcfg.kl_tau_squared)
      return loss, {**terms, **t}
    if cache is not None:
      tout = {k: batch[f"teacher_{k}"] for k in cache.keys}
      tout["scale"] = teacher_scale(frozen)
    else:
      tout = fwd(frozen, batch["image"], batch["text"])
    hp = params["heads"]
    if mcad and dcfg.mcad.proj == "fixed":
      hp = {k: (jax.lax.stop_gradient(v) if k not in ("proj_img", "proj_txt") else v)
            for k, v in hp.items()}
    happly = lambda method, *a: heads.apply({"params": hp}, *a, method=method)
    psi, pst = happly(heads.student_to_teacher, si, st)
    ti, tt, tsim = tout["v"], tout["t"], None
    loss = 0.0
    if mcad and dcfg.mcad.mode == "matched":
      ti, tt = happly(heads.modify, tout["v"], tout["t"], tout["f"], dcfg.mcad.alpha)
      if dcfg.mcad.proj == "learned" and dcfg.mcad.proj_contrastive > 0:
        aux = losses.infonce(ti, tt, tout["scale"])
        terms["loss/mcad_teacher_infonce"] = aux
        loss = dcfg.mcad.proj_contrastive * aux
    elif mcad:  # all_pairs
      itok, ttok, tmask = tout["tokens"]

      def itm_fn(rows, cols):
        r, c = rows.reshape(-1), cols.reshape(-1)
        return fwd.fuse(frozen, itok[r], ttok[c], tmask[c])[1].reshape(rows.shape)

      tsim = jax.lax.stop_gradient(
          distill.mcad_teacher_sim(tout["v"], tout["t"], itm_fn, dcfg.mcad.itm_weight, dcfg.mcad.topk))
    nodes = distill.Nodes({"ti": ti, "tt": tt, "si": si, "st": st}, {"si": psi, "st": pst}, tsim)
    tau = dcfg.kl_temperature or 1.0 / tout["scale"]
    gl, t = distill.graph_loss(nodes, table, saux["logit_scale"], tau, dcfg.kl_tau_squared)
    return loss + gl, {**terms, **t}

  update_mask = None
  if dcfg.recipe == "conaclip" and dcfg.conaclip.schedule == "two_stage":
    half = scfg.steps // 2
    img_side = ("img", "img_head", "proj_img", "log_scale", "bias")

    def update_mask(step, params):
      first = (step < half).astype(jnp.float32)

      def one(path, x):
        from mcad_jax.sharding import path_str

        name = path_str(path)
        image_part = any(f"/{k}" in f"/{name}" for k in img_side)
        return jnp.where(image_part, first, 1.0 - first) * jnp.ones_like(x)

      return jax.tree_util.tree_map_with_path(one, params)

  keys = ("image", "text") + (tuple(f"teacher_{k}" for k in cache.keys) if cache else ())
  return Stage(
      init=init, loss_fn=loss_fn, frozen=frozen, update_mask=update_mask, batch_keys=keys,
      load_init=pretrained_init(config, scfg, student, under="student"),
      host_fn=cache.lookup if cache else None,
      evaluate=lambda params, mesh: eval_dual(config, student, params["student"], mesh, scfg.report_as))


BUILDERS = {"dual": dual_stage, "fusion": fusion_stage, "distill": distill_stage}


def build(config, name: str, workdir: str, mesh) -> Stage:
  scfg = config[name]
  if scfg.kind not in BUILDERS:
    raise ValueError(f"unknown stage kind {scfg.kind!r}; known {tuple(BUILDERS)}")
  return BUILDERS[scfg.kind](config, scfg, workdir, mesh)
