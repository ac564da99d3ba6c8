"""The edge graph every recipe is a table of: four nodes, four loss kinds, weighted edges.

Nodes are the teacher's and the student's image and text embeddings of one batch:

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
through a learned linear head (`heads.DistillHeads`, then L2 norm) into the
teacher's space; those heads train with the student and are not exported.
"""

from __future__ import annotations

import dataclasses

import jax

from mcad_jax import losses

NODES = ("ti", "tt", "si", "st")
EDGES = ("si_st", "ti_si", "tt_st", "ti_st", "tt_si", "si_si", "st_st")
KINDS = ("infonce", "fd", "sd", "kl")


def check_table(table) -> tuple[tuple[str, str, float], ...]:
  """The table as tuples; raises ValueError on an unknown edge or kind or a self-edge misuse."""
  table = tuple(tuple(e) for e in table)
  for edge, kind, _ in table:
    if edge not in EDGES:
      raise ValueError(f"unknown edge {edge!r}; known {EDGES}")
    if kind not in KINDS:
      raise ValueError(f"unknown loss kind {kind!r} on edge {edge}; known {KINDS}")
    a, b = edge.split("_")
    if a == b and kind in ("infonce", "fd"):
      raise ValueError(f"edge {edge} joins a node to itself: use 'kl' or 'sd', not {kind!r}")
  return table


def reads_teacher(table) -> bool:
  """Whether any edge reads a teacher node (directly, or as the target of kl / sd)."""
  return any("t" in (edge[0], edge.split("_")[1][0]) or kind in ("kl", "sd")
             for edge, kind, _ in table)


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
