"""MCAD (arXiv 2310.19654): the dual teacher's features modified by the fusion teacher's.

Our reading of the paper's abstract (its full text was not available; each choice is a
config option, `distill.mcad`): the modified teacher is v' = norm(v + a * P_v(f)),
t' = norm(t + a * P_t(f)) with f the fusion teacher's [CLS] feature of the matched pair
(`mode='matched'`); `combine` is add, concat (a projection of [v; f]) or gate
(v + sigmoid(G f) * P f). P is learned, with an InfoNCE on (v', t') that keeps the
modified teacher discriminative, or fixed at its random init (`proj='fixed'`: the teacher
side then gets no gradient and no update). In `all_pairs` mode the teacher similarity is
v_i.t_j + b * ITM_ij on each row's top-k pairs instead. On the hard columns the fusion
teacher's match logit is added to the dual teacher's scores (`hard_itm_weight`): that
is our addition, not the paper's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mcad_jax import losses

# Modified-teacher KL both ways + feature distillation + the student's InfoNCE, plus the
# interactive edges (student tower vs the other modified teacher tower). Without them MCAD
# lost to the student alone on shapes (RESULTS.md, "What was tried").
EDGES = (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0), ("ti_si", "fd", 1.0),
         ("tt_st", "fd", 1.0), ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5))
MODES = ("matched", "all_pairs")
PROJS = ("learned", "fixed")
# Params that build the modified teacher features (the heads' projections of the fused feature
# and, with combine='gate', the gates): the teacher side of the distillation.
TEACHER_SIDE = (r"^heads/(p_v|p_t|g_v|g_t)/",)


def teacher_dims(dual_params: Any, fusion_params: Any | None) -> tuple[int, int]:
  """(teacher embedding width, fused feature width) read off the params."""
  e = dual_params["img_head"]["kernel"].shape[-1]
  f = fusion_params["fusion"]["itm_head"]["kernel"].shape[0] if fusion_params is not None else 0
  return int(e), int(f)


def freeze(mcfg) -> tuple[str, ...]:
  """Param patterns the optimizer leaves alone: the teacher side when it is fixed (its gradient
  is stopped in the loss; AdamW's weight decay would still shrink it)."""
  return TEACHER_SIDE if mcfg.proj == "fixed" else ()


def head_params(hp: dict, mcfg) -> dict:
  """The heads' params as the loss reads them: with `proj='fixed'` only the student-to-teacher
  projections carry gradients."""
  if mcfg.proj != "fixed":
    return hp
  return {k: (jax.lax.stop_gradient(v) if k not in ("proj_img", "proj_txt") else v)
          for k, v in hp.items()}


def modified_teacher(happly, heads, tout: dict, mcfg):
  """matched mode: (v', t', the teacher side's own loss, its terms)."""
  ti, tt = happly(heads.modify, tout["v"], tout["t"], tout["f"], mcfg.alpha)
  loss, terms = 0.0, {}
  if mcfg.proj == "learned" and mcfg.proj_contrastive > 0:
    aux = losses.infonce(ti, tt, tout["scale"])
    terms["loss/mcad_teacher_infonce"] = aux
    loss = mcfg.proj_contrastive * aux
  return ti, tt, loss, terms


def all_pairs_sim(v, t, itm_fn, b: float, topk: int) -> jax.Array:
  """all_pairs mode: v_i.t_j + b * ITM_ij on each row's top-k pairs (others unchanged).

  Args:
    itm_fn: (row_idx [B, k], col_idx [B, k]) -> ITM logits [B, k].
  """
  sim = v @ t.T
  k = min(topk, sim.shape[1])
  _, cols = jax.lax.top_k(sim, k)
  rows = jnp.broadcast_to(jnp.arange(sim.shape[0])[:, None], cols.shape)
  itm = itm_fn(rows, cols)
  return sim.at[rows, cols].add(b * itm)


def all_pairs_target(tout: dict, fwd, frozen, mcfg) -> jax.Array:
  """The all_pairs teacher similarity of a batch, online (it needs ITM over pairs)."""
  itok, ttok, tmask = tout["tokens"]

  def itm_fn(rows, cols):
    r, c = rows.reshape(-1), cols.reshape(-1)
    return fwd.fuse(frozen, itok[r], ttok[c], tmask[c])[1].reshape(rows.shape)

  return jax.lax.stop_gradient(all_pairs_sim(tout["v"], tout["t"], itm_fn, mcfg.itm_weight, mcfg.topk))
