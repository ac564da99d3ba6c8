"""ConaCLIP (arXiv 2305.17652): every edge of the four-node graph, optionally in two stages.

"Intra-modal student-student" is read as the student's image-image (text-text) similarity
structure matched to the teacher's (our reading; the paper's full text was not available).
With `conaclip.schedule='two_stage'` the image side trains for the first half of the steps
and the text side for the second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcad_jax.sharding import path_str

EDGES = (("si_st", "infonce", 1.0), ("ti_si", "fd", 1.0), ("tt_st", "fd", 1.0),
         ("ti_st", "infonce", 0.5), ("tt_si", "infonce", 0.5), ("si_si", "kl", 1.0),
         ("st_st", "kl", 1.0))
SCHEDULES = ("joint", "two_stage")
_IMAGE_SIDE = ("img", "img_head", "proj_img", "log_scale", "bias")


def update_mask(steps: int):
  """two_stage: (step, params) -> 1 on the image side's params before steps // 2, else on the
  rest."""
  half = steps // 2

  def mask(step, params):
    first = (step < half).astype(jnp.float32)

    def one(path, x):
      name = path_str(path)
      image_part = any(f"/{k}" in f"/{name}" for k in _IMAGE_SIDE)
      return jnp.where(image_part, first, 1.0 - first) * jnp.ones_like(x)

    return jax.tree_util.tree_map_with_path(one, params)

  return mask
