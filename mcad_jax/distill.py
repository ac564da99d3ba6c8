"""Distillation recipes as loss graphs: MCAD, ConaCLIP, CLIP-KD, TinyCLIP, student alone.

Every recipe is a table of edges over four nodes, the teacher's and the
student's image and text embeddings:

  ti, tt   teacher image / text (for MCAD: the *modified* teacher v', t')
  si, st   student image / text

An edge is (nodes, loss kind, weight). Kinds, for an edge (a, b):
  infonce  symmetric InfoNCE between a and b (matched pairs on the diagonal);
  fd       mean squared distance of paired features;
  sd       mean squared difference between sim(a, b) and the teacher's sim,
           where the teacher's counterpart of each student node is taken;
  kl       KL, both directions, between softmax(teacher sim / tau) and
           softmax(sim(a, b) / tau); times tau^2 with `kl_tau_squared`. Off by
           default: at contrastive temperatures (tau ~ 0.01-0.05) tau^2 makes the
           term vanish (we measured KL terms of ~0.002 with it on).
Where an edge joins a teacher and a student node, the student embedding goes
through a learned linear head (then L2 norm) into the teacher's space; those
heads are trained with the student and are not part of the exported model.

Our reading (the papers' full text was not available; each choice is a config
option): MCAD's modified teacher is v' = norm(v + a * P_v(f)), t' = norm(t + a *
P_t(f)) with f the fusion teacher's [CLS] feature of the matched pair
(`mcad.mode='matched'`), or, in `all_pairs` mode, the teacher similarity
v_i.t_j + b * ITM_ij on each row's top-k pairs. `combine` is add, concat (a
projection of [v; f]) or gate (v + sigmoid(G f) * P f). P is learned, with an
InfoNCE on (v', t') that keeps the modified teacher discriminative, or fixed
at its random init. ConaCLIP's graph uses every edge; "intra-modal
student-student" is read as the student's image-image (text-text) similarity
structure matched to the teacher's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcad_jax import losses
from mcad_jax.models import layers
from mcad_jax.models.two_tower import l2_normalize

NODES = ("ti", "tt", "si", "st")
EDGES = ("si_st", "ti_si", "tt_st", "ti_st", "tt_si", "si_si", "st_st")
KINDS = ("infonce", "fd", "sd", "kl")
RECIPES = ("student_only", "clip_kd", "tinyclip", "conaclip", "mcad")

# Default edge tables: (edge, kind, weight). A config's `edges` replaces these.
DEFAULT_EDGES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "student_only": (("si_st", "infonce", 1.0),),
    # Affinity mimicking: the student's image-text affinities follow the teacher's.
    "tinyclip": (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0)),
    # KL on logits + feature MSE + interactive contrastive (student vs teacher towers).
    "clip_kd": (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0), ("ti_si", "fd", 1.0),
                ("tt_st", "fd", 1.0), ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5)),
    # Every edge of the four-node graph on.
    "conaclip": (("si_st", "infonce", 1.0), ("ti_si", "fd", 1.0), ("tt_st", "fd", 1.0),
                 ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5), ("si_si", "kl", 1.0),
                 ("st_st", "kl", 1.0)),
    # Modified-teacher KL both ways + feature distillation + the student's InfoNCE, plus the
    # interactive edges (student tower vs the other modified teacher tower). Without them MCAD
    # lost to the student alone on shapes (RESULTS.md, "What was tried").
    "mcad": (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0), ("ti_si", "fd", 1.0),
             ("tt_st", "fd", 1.0), ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5)),
}


def edge_table(dcfg) -> tuple[tuple[str, str, float], ...]:
  """The recipe's edges, or the config's own table if it gives one."""
  table = tuple(tuple(e) for e in dcfg.edges) if dcfg.edges else DEFAULT_EDGES[dcfg.recipe]
  for edge, kind, _ in table:
    if edge not in EDGES:
      raise ValueError(f"unknown edge {edge!r}; known {EDGES}")
    if kind not in KINDS:
      raise ValueError(f"unknown loss kind {kind!r} on edge {edge}; known {KINDS}")
    a, b = edge.split("_")
    if a == b and kind in ("infonce", "fd"):
      raise ValueError(f"edge {edge} joins a node to itself: use 'kl' or 'sd', not {kind!r}")
  return table


def uses_teacher(dcfg) -> bool:
  """Whether any edge reads a teacher node (directly, or as the target of kl / sd)."""
  return any("t" in (edge[0], edge.split("_")[1][0]) or kind in ("kl", "sd")
             for edge, kind, _ in edge_table(dcfg))


def needs_fusion(dcfg) -> bool:
  return dcfg.recipe == "mcad"


class DistillHeads(nn.Module):
  """Trainable parts of a distillation that are not the student: projections.

  Attributes:
    teacher_dim: width of the teacher embeddings.
    fused_dim: width of the fusion teacher's feature (MCAD only; 0 if unused).
    combine: MCAD combination: 'add', 'concat' or 'gate'.
  """

  teacher_dim: int
  fused_dim: int = 0
  combine: str = "add"

  def setup(self):
    dense = lambda name, n: nn.Dense(n, use_bias=False, kernel_init=layers.dense_init, name=name)
    self.proj_img = dense("proj_img", self.teacher_dim)
    self.proj_txt = dense("proj_txt", self.teacher_dim)
    if self.fused_dim:
      self.p_v = dense("p_v", self.teacher_dim)
      self.p_t = dense("p_t", self.teacher_dim)
      if self.combine == "gate":
        self.g_v = nn.Dense(self.teacher_dim, name="g_v")
        self.g_t = nn.Dense(self.teacher_dim, name="g_t")

  def student_to_teacher(self, si, st):
    return l2_normalize(self.proj_img(si)), l2_normalize(self.proj_txt(st))

  def modify(self, v, t, f, alpha: float):
    """MCAD: fold the fused feature f into the teacher features."""
    if self.combine == "add":
      return l2_normalize(v + alpha * self.p_v(f)), l2_normalize(t + alpha * self.p_t(f))
    if self.combine == "concat":
      return (l2_normalize(self.p_v(jnp.concatenate([v, alpha * f], -1))),
              l2_normalize(self.p_t(jnp.concatenate([t, alpha * f], -1))))
    if self.combine == "gate":
      gv, gt = jax.nn.sigmoid(self.g_v(f)), jax.nn.sigmoid(self.g_t(f))
      return l2_normalize(v + alpha * gv * self.p_v(f)), l2_normalize(t + alpha * gt * self.p_t(f))
    raise ValueError(f"unknown MCAD combine {self.combine!r}; use add, concat or gate")

  def __call__(self, si, st, v, t, f):
    """Init-time path touching every parameter."""
    out = self.student_to_teacher(si, st)
    if self.fused_dim:
      out = out + self.modify(v, t, f, 1.0)
    return out


@dataclasses.dataclass(frozen=True)
class Nodes:
  """Embeddings of the graph's nodes for one batch.

  `proj` holds the student nodes mapped into teacher space (for T-S edges).
  `teacher_sim` optionally replaces ti.tt^T (MCAD all_pairs mode).
  """

  emb: dict[str, jax.Array]
  proj: dict[str, jax.Array]
  teacher_sim: jax.Array | None = None


def _counterpart(node: str) -> str:
  return "t" + node[1]


def _pair(nodes: Nodes, a: str, b: str):
  """Embeddings of an edge's two ends, in a shared space."""
  cross = (a[0] == "t") != (b[0] == "t")
  get = lambda n: nodes.proj[n] if (cross and n[0] == "s") else nodes.emb[n]
  return get(a), get(b)


def _teacher_sim(nodes: Nodes, a: str, b: str) -> jax.Array:
  ta, tb = _counterpart(a), _counterpart(b)
  if nodes.teacher_sim is not None and (ta, tb) == ("ti", "tt"):
    return nodes.teacher_sim
  return nodes.emb[ta] @ nodes.emb[tb].T


def edge_loss(nodes: Nodes, edge: str, kind: str, scale: jax.Array, tau: float,
              tau_squared: bool = False) -> jax.Array:
  a, b = edge.split("_")
  za, zb = _pair(nodes, a, b)
  if kind == "infonce":
    return losses.infonce(za, zb, scale)
  if kind == "fd":
    return losses.feature_l2(za, zb)
  target = jax.lax.stop_gradient(_teacher_sim(nodes, a, b))
  if kind == "sd":
    return losses.sim_l2(za @ zb.T, target)
  if kind == "kl":
    return losses.kl_sim(za @ zb.T, target, tau, tau_squared)
  raise ValueError(f"unknown loss kind {kind!r}")


def graph_loss(nodes: Nodes, table, scale, tau: float,
               tau_squared: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the table's edge losses, and each term for logging."""
  total, terms = 0.0, {}
  for edge, kind, weight in table:
    val = edge_loss(nodes, edge, kind, scale, tau, tau_squared)
    terms[f"loss/{edge}_{kind}"] = val
    total = total + weight * val
  return total, terms


def mcad_teacher_sim(v, t, itm_fn, b: float, topk: int) -> jax.Array:
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


def teacher_dims(dual_params: Any, fusion_params: Any | None) -> tuple[int, int]:
  """(teacher embedding width, fused feature width) read off the params."""
  e = dual_params["img_head"]["kernel"].shape[-1]
  f = fusion_params["fusion"]["itm_head"]["kernel"].shape[0] if fusion_params is not None else 0
  return int(e), int(f)


# ----------------------------------------------------------------------------- hard columns

# Each image's hard captions (shapes): its canonical two-object caption, then the twins.
HARD_COLUMNS = ("true", "relation", "attribute")


def hard_valid(batch) -> tuple[jax.Array, jax.Array]:
  """([B, 3] valid hard columns, [B] row weights): a row counts if it has a twin."""
  tv = batch["hn_true_valid"]
  valid = jnp.stack([tv] + [batch[f"hn_{k}_valid"] & tv for k in HARD_COLUMNS[1:]], 1)
  return valid, (jnp.sum(valid, 1) >= 2).astype(jnp.float32)


def hard_accuracy(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Share of valid twins that score below their canonical caption (training-batch hn accuracy)."""
  twins = valid[:, 1:]
  wins = (logits[:, :1] > logits[:, 1:]) & twins
  return jnp.sum(wins) / jnp.maximum(jnp.sum(twins), 1)


def teacher_hard_logits(tout: dict, batch: dict, fwd, frozen, cached: bool,
                        itm_weight: float) -> jax.Array:
  """[B, 3] teacher logits of each image's hard captions: scale * v.t (+ itm_weight * ITM).

  The dual teacher's similarity for every recipe; MCAD adds the fusion teacher's
  match logit (`itm_weight` > 0), the all-pairs reading of the modified teacher
  restricted to these columns. From the cache (`teacher_hard_t`, `teacher_hard_itm`)
  or computed online from the batch's hard caption ids.
  """
  if cached:
    t_hard = tout["hard_t"]                                        # [B, 3, E]
    itm = tout.get("hard_itm")
  else:
    # Each teacher reads the hard captions in its own tokenizer's ids.
    ids = jnp.concatenate([batch[fwd.key(f"hn_{k}", "dual")] for k in HARD_COLUMNS])
    fkey = fwd.key("hn_true", "fusion")
    fids = (jnp.concatenate([batch[fwd.key(f"hn_{k}", "fusion")] for k in HARD_COLUMNS])
            if fkey is not None else None)
    t, ttok = fwd.text(frozen, ids, fids)
    b = tout["v"].shape[0]
    t_hard = t.reshape(len(HARD_COLUMNS), b, -1).swapaxes(0, 1)
    itm = None
    if itm_weight and fwd.fuse is not None:
      itok = jnp.concatenate([tout["tokens"][0]] * len(HARD_COLUMNS))
      itm = fwd.fuse(frozen, itok, *ttok)[1].reshape(len(HARD_COLUMNS), b).T
  logits = tout["scale"] * jnp.einsum("be,bce->bc", tout["v"], t_hard)
  if itm_weight and itm is not None:
    logits = logits + itm_weight * itm
  return jax.lax.stop_gradient(logits)
