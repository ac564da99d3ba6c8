"""The `distill` stage kind: a student trained from frozen teachers by a recipe.

The recipe's loss graph is `mcad_jax/distill.py`; the teachers' forward passes
are `stages/teachers.py`; with `distill.cache` their per-example outputs come
from the teacher-output cache instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcad_jax import distill, losses, teacher_cache
from mcad_jax.stages import common
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, eval_dual, pretrained_init, teacher_scale
from mcad_jax.stages.teachers import load_teachers, teacher_fns

HARD = distill.HARD_COLUMNS
# Params that build MCAD's modified teacher features (the heads' projections of the fused feature
# and, with `combine='gate'`, the gates): the teacher side of the distillation.
MCAD_TEACHER_SIDE = (r"^heads/(p_v|p_t|g_v|g_t)/",)


def distill_stage(config, scfg, workdir: str, mesh) -> Stage:
  dcfg = scfg
  table = distill.edge_table(dcfg)
  student = dual_model(config, scfg.model)
  img, txt = dummy_batch(config, model_cfg=scfg.model)
  frozen = load_teachers(config, dcfg, workdir, mesh) if distill.uses_teacher(dcfg) else None
  mcad = dcfg.recipe == "mcad"
  t_dim, f_dim = (distill.teacher_dims(frozen["dual"], frozen["fusion"]) if frozen is not None
                  else (scfg.model.embed_dim, 0))
  heads = distill.DistillHeads(t_dim, f_dim if mcad else 0, dcfg.mcad.combine)
  fwd = teacher_fns(config, dcfg) if frozen is not None else None
  hard = bool(dcfg.hard_columns)
  cache = None
  if frozen is not None and dcfg.cache:
    cache = teacher_cache.TeacherCache.build(config, frozen, fwd, mesh, hard=hard,
                                             cache_dir=dcfg.cache_dir)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    s = student.init(r1, img, txt)["params"]
    e = scfg.model.embed_dim
    h = heads.init(r2, jnp.zeros((1, e)), jnp.zeros((1, e)), jnp.zeros((1, t_dim)),
                   jnp.zeros((1, t_dim)), jnp.zeros((1, max(f_dim, 1))))["params"]
    return {"student": s, "heads": h}

  def hard_logits(params, batch, si, scale):
    """The student's [B, 3] logits for each image's canonical caption and its twins."""
    enc = lambda ids: student.apply({"params": params["student"]}, ids, method=student.encode_text)[0]
    return distill.hard_logits(enc, si, batch, scale)

  def loss_fn(params, batch, rng, frozen, step=None):
    del rng, step
    si, st, saux = student.apply({"params": params["student"]}, batch["image"], batch["text"])
    terms = {"logit_scale": saux["logit_scale"]}
    if hard:
      valid, row_w = distill.hard_valid(batch)
      g = hard_logits(params, batch, si, saux["logit_scale"])
      terms["hard_acc"] = distill.hard_accuracy(g, valid)
    if frozen is None:
      nodes = distill.Nodes({"si": si, "st": st}, {})
      loss, t = distill.graph_loss(nodes, table, saux["logit_scale"], dcfg.kl_temperature or 0.05,
                                   dcfg.kl_tau_squared)
      if hard:  # No teacher: the twins are hard negatives (NegCLIP-style), weighted as the
        # ground truth is in every other recipe (hard_label_weight) when that is set.
        t["loss/hard_softmax"] = losses.candidate_softmax(g, valid, row_w)
        loss = loss + (dcfg.get("hard_label_weight", 0.0) or dcfg.hard_weight) * t["loss/hard_softmax"]
      return loss, {**terms, **t}
    if cache is not None:
      tout = {k: batch[f"teacher_{k}"] for k in cache.keys}
      tout["scale"] = teacher_scale(frozen)
    else:
      tout = fwd.on_batch(frozen, batch)
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
    if hard:
      # The hard columns, scored by this recipe's teacher: the dual teacher's similarity, plus
      # for MCAD the fusion teacher's match logit (its reading of binding).
      th = distill.teacher_hard_logits(tout, batch, fwd, frozen, cache is not None,
                                       dcfg.mcad.hard_itm_weight if mcad else 0.0)
      t["loss/hard_kl"] = losses.kl_candidates(th, g, valid, row_w)
      terms["teacher_hard_acc"] = distill.hard_accuracy(th, valid)
      gl = gl + dcfg.hard_weight * t["loss/hard_kl"]
      if dcfg.get("hard_label_weight", 0.0):
        t["loss/hard_softmax"] = losses.candidate_softmax(g, valid, row_w)
        gl = gl + dcfg.hard_label_weight * t["loss/hard_softmax"]
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
  online = fwd is not None and cache is None  # Online teachers read their own tokenizers' ids.
  if hard:
    keys += distill.HARD_KEYS
    keys += fwd.keys(tuple(f"hn_{k}" for k in HARD)) if online else ()
  # `mcad.proj='fixed'` keeps the teacher side as initialised: its gradients are stopped in the
  # loss, and the optimizer leaves it alone too (AdamW's weight decay would shrink it otherwise).
  freeze = MCAD_TEACHER_SIDE if mcad and dcfg.mcad.proj == "fixed" else ()
  return Stage(
      init=init, loss_fn=loss_fn, frozen=frozen, update_mask=update_mask, freeze=freeze,
      batch_keys=keys + (fwd.batch_keys if online else ()),
      load_init=pretrained_init(config, scfg, student, under="student"),
      host_fn=cache.lookup if cache else None, tokenizer=common.tokenizer(config, scfg.model),
      extra_tokenizers=tuple(t for t in fwd.tokenizers.values() if t) if online else (),
      evaluate=lambda params, mesh: eval_dual(config, student, params["student"], mesh,
                                              scfg.report_as, scfg.model))
