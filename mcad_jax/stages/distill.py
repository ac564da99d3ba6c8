"""The `distill` stage kind: a student trained from frozen teachers by a recipe.

The recipes are `mcad_jax/recipes/` (the edge graph, MCAD's modified teacher, ConaCLIP's
schedule, the hard columns); the teachers' forward passes are `stages/teachers.py`; with
`distill.cache` their per-example outputs come from the teacher-output cache instead. The
loss is `DistillLoss`, an object a test can build and call on its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from mcad_jax import config_lib as cl, losses, recipes, teacher_cache
from mcad_jax.recipes import conaclip, graph, hard_columns, heads as heads_lib, mcad
from mcad_jax.recipes.heads import DistillHeads
from mcad_jax.stages import common
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, eval_dual, pretrained_init, teacher_scale
from mcad_jax.stages.teachers import TeacherFns, load_teachers, teacher_fns


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity: jit keys its cache on it.
class DistillLoss:
  """A recipe's loss: (params, batch, rng, frozen, step=None) -> (loss, terms).

  `params` holds 'student' and 'heads'; `frozen` the teachers' params (None: the student
  alone). Teacher outputs come from the batch (`teacher_<key>`, the cache) when `cache_keys`
  is set, else from `fwd` online.
  """

  dcfg: Any
  student: Any
  heads: DistillHeads
  table: tuple
  fwd: TeacherFns | None = None
  cache_keys: tuple[str, ...] | None = None

  @property
  def mcad(self) -> bool:
    return self.dcfg.recipe == "mcad"

  def __call__(self, params, batch, rng, frozen, step=None):
    del rng, step
    si, st, saux = self.student.apply({"params": params["student"]}, batch["image"], batch["text"])
    terms = {"logit_scale": saux["logit_scale"]}
    hard = None
    if self.dcfg.hard_columns:
      valid, row_w = hard_columns.hard_valid(batch)
      g = self.student_hard_logits(params, batch, si, saux["logit_scale"])
      terms["hard_acc"] = hard_columns.hard_accuracy(g, valid)
      hard = (g, valid, row_w)
    if frozen is None:
      return self.alone(si, st, saux, hard, terms)
    return self.distilled(params, batch, frozen, si, st, saux, hard, terms)

  def student_hard_logits(self, params, batch, si, scale):
    """The student's [B, 3] logits for each image's canonical caption and its twins."""
    enc = lambda ids: self.student.apply({"params": params["student"]}, ids,
                                         method=self.student.encode_text)[0]
    return hard_columns.hard_logits(enc, si, batch, scale)

  def alone(self, si, st, saux, hard, terms):
    """No teacher: the graph's student edges; the twins are hard negatives (NegCLIP-style),
    weighted as the ground truth is in every other recipe (hard_label_weight) when that is set."""
    d = self.dcfg
    nodes = graph.Nodes({"si": si, "st": st}, {})
    loss, t = graph.graph_loss(nodes, self.table, saux["logit_scale"], d.kl_temperature or 0.05,
                               d.kl_tau_squared)
    if hard is not None:
      t["loss/hard_softmax"] = losses.candidate_softmax(*hard)
      loss = loss + (d.get("hard_label_weight", 0.0) or d.hard_weight) * t["loss/hard_softmax"]
    return loss, {**terms, **t}

  def teacher_outputs(self, batch, frozen) -> dict:
    if self.cache_keys is not None:
      tout = {k: batch[f"teacher_{k}"] for k in self.cache_keys}
      tout["scale"] = teacher_scale(frozen)
      return tout
    return self.fwd.on_batch(frozen, batch)

  def distilled(self, params, batch, frozen, si, st, saux, hard, terms):
    """The recipe's edge graph over student and (for MCAD, modified) teacher nodes, plus the
    hard columns scored by the recipe's teacher."""
    d = self.dcfg
    tout = self.teacher_outputs(batch, frozen)
    hp = mcad.head_params(params["heads"], d.mcad) if self.mcad else params["heads"]
    happly = lambda method, *a: self.heads.apply({"params": hp}, *a, method=method)
    psi, pst = happly(self.heads.student_to_teacher, si, st)
    ti, tt, tsim = tout["v"], tout["t"], None
    loss = 0.0
    if self.mcad and d.mcad.mode == "matched":
      ti, tt, loss, t_side = mcad.modified_teacher(happly, self.heads, tout, d.mcad)
      terms.update(t_side)
    elif self.mcad:  # all_pairs
      tsim = mcad.all_pairs_target(tout, self.fwd, frozen, d.mcad)
    nodes = graph.Nodes({"ti": ti, "tt": tt, "si": si, "st": st}, {"si": psi, "st": pst}, tsim)
    tau = d.kl_temperature or 1.0 / tout["scale"]
    gl, t = graph.graph_loss(nodes, self.table, saux["logit_scale"], tau, d.kl_tau_squared)
    if hard is not None:
      g, valid, row_w = hard
      # The hard columns, scored by this recipe's teacher: the dual teacher's similarity, plus
      # for MCAD the fusion teacher's match logit (its reading of binding; our addition).
      th = hard_columns.teacher_hard_logits(tout, batch, self.fwd, frozen, self.cache_keys is not None,
                                            d.mcad.hard_itm_weight if self.mcad else 0.0)
      terms["teacher_hard_acc"] = hard_columns.hard_accuracy(th, valid)
      gl, t_hard = hard_columns.add_distill_terms(gl, g, th, valid, row_w, d)
      t.update(t_hard)
    return loss + gl, {**terms, **t}


def _heads_init(heads, student_dim: int, t_dim: int, f_dim: int):
  def init(rng):
    e = student_dim
    return heads.init(rng, jnp.zeros((1, e)), jnp.zeros((1, e)), jnp.zeros((1, t_dim)),
                      jnp.zeros((1, t_dim)), jnp.zeros((1, max(f_dim, 1))))["params"]
  return init


def _batch_keys(dcfg, fwd, cache) -> tuple[str, ...]:
  """The batch fields the loss reads: images and captions, cached teacher outputs, the hard
  columns, and the online teachers' own tokenizers' ids."""
  keys = ("image", "text") + (tuple(f"teacher_{k}" for k in cache.keys) if cache else ())
  online = fwd is not None and cache is None
  if dcfg.hard_columns:
    keys += hard_columns.HARD_KEYS
    keys += fwd.keys(tuple(f"hn_{k}" for k in hard_columns.HARD_COLUMNS)) if online else ()
  return keys + (fwd.batch_keys if online else ())


def distill_stage(config, scfg, workdir: str, mesh) -> Stage:
  dcfg = scfg
  student = dual_model(config, scfg.model)
  img, txt = dummy_batch(config, model_cfg=scfg.model)
  frozen = load_teachers(config, dcfg, workdir, mesh) if recipes.uses_teacher(dcfg) else None
  is_mcad = dcfg.recipe == "mcad"
  t_dim, f_dim = (mcad.teacher_dims(frozen["dual"], frozen["fusion"]) if frozen is not None
                  else (scfg.model.embed_dim, 0))
  heads = DistillHeads(t_dim, f_dim if is_mcad else 0, dcfg.mcad.combine)
  fwd = teacher_fns(config, dcfg) if frozen is not None else None
  cache = None
  if frozen is not None and dcfg.cache:
    cache = teacher_cache.TeacherCache.build(config, frozen, fwd, mesh, hard=bool(dcfg.hard_columns),
                                             cache_dir=dcfg.cache_dir)
  heads_init = _heads_init(heads, scfg.model.embed_dim, t_dim, f_dim)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    return {"student": student.init(r1, img, txt)["params"], "heads": heads_init(r2)}

  loss_fn = DistillLoss(dcfg, student, heads, recipes.edge_table(dcfg), fwd,
                        cache.keys if cache else None)
  two_stage = dcfg.recipe == "conaclip" and dcfg.conaclip.schedule == "two_stage"
  online = fwd is not None and cache is None  # Online teachers read their own tokenizers' ids.
  return Stage(
      init=init, loss_fn=loss_fn, frozen=frozen,
      update_mask=conaclip.update_mask(scfg.steps) if two_stage else None,
      # `mcad.proj='fixed'` keeps the teacher side as initialised.
      freeze=mcad.freeze(dcfg.mcad) if is_mcad else (),
      batch_keys=_batch_keys(dcfg, fwd, cache),
      load_init=pretrained_init(config, scfg, student, under="student"),
      host_fn=cache.lookup if cache else None, tokenizer=common.tokenizer(config, scfg.model),
      extra_tokenizers=tuple(t for t in fwd.tokenizers.values() if t) if online else (),
      evaluate=lambda params, mesh: eval_dual(config, student, params["student"], mesh,
                                              scfg.report_as, scfg.model))


def validate(config, name: str, s) -> None:
  """Checks this stage kind's own section `s` (named `name`); raises config_lib.ConfigError."""
  cl.need(s.recipe in recipes.RECIPES, f"{name}.recipe",
          f"unknown recipe {s.recipe!r}; known {recipes.RECIPES}")
  try:
    recipes.edge_table(s)
  except ValueError as e:
    raise cl.ConfigError(f"{name}.edges", str(e)) from None
  m = s.mcad
  cl.need(m.mode in mcad.MODES, f"{name}.mcad.mode", f"unknown mode {m.mode!r}; known {mcad.MODES}")
  cl.need(m.combine in heads_lib.COMBINES, f"{name}.mcad.combine",
          f"unknown {m.combine!r}; known {heads_lib.COMBINES}")
  cl.need(m.proj in mcad.PROJS, f"{name}.mcad.proj", f"unknown proj {m.proj!r}; known {mcad.PROJS}")
  cl.need(m.topk >= 1, f"{name}.mcad.topk", "must be >= 1")
  for k in ("alpha", "proj_contrastive", "itm_weight", "hard_itm_weight"):
    cl.in_range(m.get(k, 0.0), f"{name}.mcad.{k}", 0)
  for j, (edge, _, w) in enumerate(recipes.edge_table(s)):
    cl.need(math.isfinite(w) and w >= 0, f"{name}.edges[{j}]", f"weight of {edge} must be >= 0, got {w}")
  cl.need(s.conaclip.schedule in conaclip.SCHEDULES, f"{name}.conaclip.schedule",
          f"unknown schedule {s.conaclip.schedule!r}; known {conaclip.SCHEDULES}")
  cl.need(s.kl_temperature >= 0, f"{name}.kl_temperature", "must be >= 0 (0 = teacher's)")
  for k in ("hard_weight", "hard_label_weight"):
    cl.in_range(s.get(k, 0.0), f"{name}.{k}", 0)
  if recipes.uses_teacher(s):
    cl.stage_ref(config, name, f"{name}.teachers.dual", s.teachers.dual, "dual")
  if recipes.needs_fusion(s):
    cl.stage_ref(config, name, f"{name}.teachers.fusion", s.teachers.fusion, "fusion")
  if s.hard_columns:
    cl.need(config.data.get("hard_negatives", False), f"{name}.hard_columns",
            "hard columns need data.hard_negatives=True (a dataset with twins: shapes)")
  if s.cache:
    cl.need(not config.data.augment, f"{name}.cache", "the teacher cache needs data.augment=False")
    cl.need(not (s.recipe == "mcad" and m.mode == "all_pairs"), f"{name}.cache",
            "MCAD all_pairs mode needs ITM over all pairs: online teachers only")
