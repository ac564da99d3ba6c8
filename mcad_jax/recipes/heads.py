"""The trainable parts of a distillation that are not the student: projection heads.

Every recipe with a teacher maps the student's embeddings into the teacher's space
(`student_to_teacher`); MCAD also projects the fusion teacher's fused feature into it to
build the modified teacher features (`modify`, see `recipes/mcad.py`). They are one
module so that one init covers both; none of it is exported with the student.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcad_jax.models import layers
from mcad_jax.models.two_tower import l2_normalize

COMBINES = ("add", "concat", "gate")


class DistillHeads(nn.Module):
  """Projections of a distillation.

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
    raise ValueError(f"unknown MCAD combine {self.combine!r}; use {COMBINES}")

  def __call__(self, si, st, v, t, f):
    """Init-time path touching every parameter."""
    out = self.student_to_teacher(si, st)
    if self.fused_dim:
      out = out + self.modify(v, t, f, 1.0)
    return out
