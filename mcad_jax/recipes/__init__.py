"""Distillation recipes: each one an edge table over the graph `graph.py` defines.

  student_only  the student's InfoNCE alone;
  clip_kd       KL on logits + feature MSE + interactive contrastive (CLIP-KD);
  tinyclip      affinity mimicking: the student's image-text affinities follow the teacher's;
  conaclip      every edge of the four-node graph (`conaclip.py`);
  mcad          the modified teacher's KL, FD and interactive edges (`mcad.py`).

A recipe that needs more than edges has a module of its own (`mcad.py`, `conaclip.py`);
what every recipe shares is here and in `heads.py` (projections into the teacher's space) and
`hard_columns.py` (each image's canonical caption and its twins). A config's `edges`
replaces a recipe's table. The distill stage (`stages/distill.py`) turns them into a loss.
"""

from __future__ import annotations

from mcad_jax.recipes import conaclip, graph, mcad

# Default edge tables: (edge, kind, weight).
EDGES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "student_only": (("si_st", "infonce", 1.0),),
    "clip_kd": (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0), ("ti_si", "fd", 1.0),
                ("tt_st", "fd", 1.0), ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5)),
    "tinyclip": (("si_st", "infonce", 1.0), ("si_st", "kl", 1.0)),
    "conaclip": conaclip.EDGES,
    "mcad": mcad.EDGES,
}
RECIPES = tuple(EDGES)


def edge_table(dcfg) -> tuple[tuple[str, str, float], ...]:
  """The recipe's edges, or the config's own table if it gives one (checked)."""
  return graph.check_table(dcfg.edges if dcfg.edges else EDGES[dcfg.recipe])


def uses_teacher(dcfg) -> bool:
  """Whether any edge reads a teacher node (directly, or as the target of kl / sd)."""
  return graph.reads_teacher(edge_table(dcfg))


def needs_fusion(dcfg) -> bool:
  """Whether the recipe reads the fusion teacher (MCAD)."""
  return dcfg.recipe == "mcad"
