"""Shapes: the built-in synthetic benchmark, whole pipeline on a laptop CPU.

Stages: teacher (dual-stream) -> fusion_teacher (single-stream, on the frozen
teacher towers) -> distill (the MCAD student) -> export (TFLite fp32/fp16/
dynamic/int8 and ONNX, verified against JAX, plus the gallery index).

  python -m mcad_jax.main --config=configs/shapes.py --workdir=workdirs/demo        # demo
  python -m mcad_jax.main --config=configs/shapes.py:smoke --workdir=workdirs/smoke # < 3 min

Variants: `demo` (default) and `smoke`. Any recipe:
  --config.distill.recipe=conaclip   (student_only, clip_kd, tinyclip, conaclip, mcad)
"""

import copy

from mcad_jax import config_lib as cl


def get_config(arg: str = ""):
  variant = arg or "demo"
  c = cl.base_config()
  c.name = f"shapes:{variant}"
  c.stages = ("teacher", "fusion_teacher", "distill", "export")
  c.data.hard_negatives = True  # Relation/attribute twins of training captions, for the fusion ITM.
  if variant == "demo":
    c.data.tfds_name = "shapes/default"
    c.data.image_size, c.data.text_len = 64, 24
    # 16 px patches on a 4x4 object grid: one object per patch at most.
    teacher = cl.model_config("nano/16", "mu", 128)
    # ln_pre (as in CLIP): a LayerNorm on the embedded patches. It keeps the residual stream's
    # tokens at unit scale, which took the int8 image encoder from mean cosine 0.987 to 0.997
    # (a scratch comparison of two students, RESULTS.md).
    student = cl.model_config("mu/16", "mu", 64, image_kw={"ln_pre": True})
    # The student's budget is a third of the teacher's: the regime where a teacher's
    # knowledge is worth most (DESIGN §6.1), and what keeps the demo under 15 minutes.
    # Fusion: 300 steps and re-ranking the top 5 keep the whole demo, export and first-run
    # dataset preparation included, under 15 minutes (400 steps / top 10 took 15.7 min).
    steps = dict(teacher=1500, fusion=300, student=500)
    fusion = dict(size="mu", depth=2, context="patches", rerank_k=5)
    batch, lr = 128, 1e-3
    c.log_every, c.ckpt_every = 50, 250
  elif variant == "smoke":
    c.data.tfds_name = "shapes/tiny"
    c.data.image_size, c.data.text_len = 32, 16
    teacher = cl.model_config("mu/8", "mu", 64)
    student = cl.model_config("mu/16", "mu", 32, image_kw={"depth": 1, "ln_pre": True})
    steps = dict(teacher=60, fusion=30, student=60)
    fusion = dict(size="mu", depth=1, context="patches")
    batch, lr = 64, 2e-3
    c.log_every, c.ckpt_every = 10, 30
  else:
    raise ValueError(f"unknown shapes variant {variant!r}; use '', 'demo' or 'smoke'")
  warm = lambda n: max(1, n // 15)
  c.teacher = cl.stage_config(teacher, steps=steps["teacher"], batch_size=batch, lr=lr,
                              warmup_steps=warm(steps["teacher"]))
  c.fusion_teacher = cl.fusion_stage_config(
      copy.deepcopy(teacher), towers_from="teacher", steps=steps["fusion"], batch_size=batch,
      lr=lr, warmup_steps=warm(steps["fusion"]))
  c.fusion_teacher.fusion.update(fusion)
  c.distill = cl.distill_stage_config(student, recipe="mcad", steps=steps["student"],
                                      batch_size=batch, lr=lr, warmup_steps=warm(steps["student"]))
  c.export = cl.export_stage_config("distill")
  if variant == "smoke":
    c.export.formats = ("fp32", "int8")
    c.export.representative_examples, c.export.parity_examples = 200, 64
  return c
