"""Shapes: the built-in synthetic benchmark, whole pipeline on a laptop CPU.

Stages: teacher (dual-stream) -> fusion_teacher (single-stream, on the frozen
teacher towers) -> distill (the MCAD student) -> export (TFLite fp32/fp16/
dynamic/int8/npu and ONNX, verified against JAX, plus the gallery index).

  python -m mcad_jax.main --config=configs/shapes.py --workdir=workdirs/demo        # demo
  python -m mcad_jax.main --config=configs/shapes.py:teachers --workdir=workdirs/t  # retrain teachers
  python -m mcad_jax.main --config=configs/shapes.py:smoke --workdir=workdirs/smoke # < 3 min

Variants:
- `demo` (default): starts the teacher and fusion-teacher stages from the weights
  shipped in `mcad_jax/weights/shapes/` (as real users start from pretrained CLIP
  and ALBEF), evaluates them, then trains the student and exports it;
- `teachers`: trains those two teachers from scratch, as shipped (the fusion
  teacher needs more steps than the demo's 15 minutes allow);
- `teachers_negclip`: the dual teacher alone, with the twins as hard negatives (NegCLIP-style),
  same budget: the fair teacher for the single-teacher recipes (shipped as `shapes_negclip`);
- `heldout`: teachers and student on `shapes/heldout`, whose train split never shows some
  colour-shape pairs and spatial facts that val and test do (hn accuracy reported apart);
- `smoke`: the whole pipeline on the tiny dataset, teachers trained in it;
- `paper_t2|t4|t6`: paper-scale students (ViT-S/16 at 224 px, 2/4/6-layer text) trained alone
  briefly, for on-device costs (see paper_config).
Any recipe: --config.distill.recipe=conaclip (student_only, clip_kd, tinyclip, conaclip, mcad).
"""

import copy

from mcad_jax import config_lib as cl, shipped


def get_config(arg: str = ""):
  variant = arg or "demo"
  if variant in PAPER_VARIANTS:
    return paper_config(variant)
  c = cl.base_config()
  c.name = f"shapes:{variant}"
  c.stages = ("teacher", "fusion_teacher", "distill", "export")
  c.data.hard_negatives = True  # Relation/attribute twins of each scene, for binding.
  if variant in ("demo", "teachers", "teachers_negclip", "heldout"):
    c.data.tfds_name = "shapes/heldout" if variant == "heldout" else "shapes/default"
    c.data.image_size, c.data.text_len = 64, 24
    # 16 px patches on a 4x4 object grid: one object per patch at most.
    teacher = cl.model_config("nano/16", "mu", 128)
    # The student reads where things are linearly (ViT and text 'moments' pooling; docs/method.md);
    # ln_pre (as in CLIP) keeps its int8 image encoder close to float. 128-d: MCAD is no worse
    # than at 64-d (RESULTS.md, "What was tried"); a phone stores 128 bytes per int8 gallery image.
    student = cl.model_config("mu/16", "mu", 128, pool="moments", image_kw={"ln_pre": True},
                              text_kw={"pool": "moments"})
    # The student's 800 steps keep `make demo` under 15 minutes: with the hard columns a step
    # costs ~2.5x a plain one. RESULTS.md compares the recipes at 1500 steps.
    steps = dict(teacher=1500, fusion=3000, student=800)
    # The fusion teacher that learns binding (docs/method.md): its own CoordConv image tokens, word
    # embeddings (not the bag-of-words-trained text tower's outputs), candidates competing in
    # one softmax (caption vs mined captions, canonical caption vs its twins), batch 64.
    fusion = dict(size="mu", depth=2, context="conv", text_source="embed", loss="softmax",
                  negatives=2, rerank_k=10)
    batch, lr, fusion_batch = 128, 1e-3, 64
    # The student's learning rate, twice the teachers': the best of 5e-4 / 1e-3 / 2e-3 for the
    # student alone, and MCAD gains more from it (RESULTS.md, "What was tried").
    student_lr = 2e-3
    c.log_every, c.ckpt_every = 50, 250
  elif variant == "smoke":
    c.data.tfds_name = "shapes/tiny"
    c.data.image_size, c.data.text_len = 32, 16
    teacher = cl.model_config("mu/8", "mu", 64)
    student = cl.model_config("mu/16", "mu", 32, pool="moments",
                              image_kw={"depth": 1, "ln_pre": True}, text_kw={"pool": "moments"})
    steps = dict(teacher=60, fusion=30, student=60)
    fusion = dict(size="mu", depth=1, context="conv", text_source="embed", loss="softmax",
                  negatives=2)
    batch, lr, fusion_batch = 64, 2e-3, 32
    student_lr = lr
    c.log_every, c.ckpt_every = 10, 30
  else:
    raise ValueError(f"unknown shapes variant {variant!r}; use one of {VARIANTS}")
  warm = lambda n: max(1, n // 15)
  c.teacher = cl.dual_stage_config(teacher, steps=steps["teacher"], batch_size=batch, lr=lr,
                                   warmup_steps=warm(steps["teacher"]))
  c.fusion_teacher = cl.fusion_stage_config(
      copy.deepcopy(teacher), towers_from="teacher", steps=steps["fusion"], batch_size=fusion_batch,
      lr=lr, warmup_steps=warm(steps["fusion"]))
  c.fusion_teacher.fusion.update(fusion)
  c.distill = cl.distill_stage_config(student, recipe="mcad", steps=steps["student"],
                                      batch_size=batch, lr=student_lr,
                                      warmup_steps=warm(steps["student"]))
  c.distill.hard_columns = True
  # The ground truth over the hard columns on top of each teacher's KL (our addition, not the
  # papers'; docs/method.md): 2 kept relations and colour at CLIP-KD's RSUM, where 1 taught colour
  # only and 4 cost 25 RSUM (RESULTS.md, "What was tried"). 0 leaves MCAD's KL alone.
  c.distill.hard_label_weight = 2.0
  # The KL over the hard columns, 3 for every recipe: MCAD's student then takes relations in at
  # every seed, where at 1 it did at three of five (RESULTS.md, "Recipes at 1500 steps").
  c.distill.hard_weight = 3.0
  c.export = cl.export_stage_config("distill")
  # Static full-integer encoders for NPU delegates, per-channel and per-tensor weights
  # (export/npu.py checks them; RESULTS.md, "NPU int8").
  c.export.formats = (*c.export.formats, "npu", "npu_per_tensor")
  c.export.reeval = (*c.export.reeval, "npu", "npu_per_tensor")
  if variant == "teachers":
    c.stages = ("teacher", "fusion_teacher")
  if variant == "heldout":
    # Held-out compositions: both teachers and the student on a train split that never shows
    # some colour-shape pairs and spatial facts; hard-negative accuracy on them is reported
    # apart (hn_<kind>_heldout / _seen in results.json). Teachers are trained here, at the
    # shipped teachers' budgets.
    c.stages = ("teacher", "fusion_teacher", "distill")
  if variant == "teachers_negclip":
    # The fair dual teacher: the shipped one's budget and command, plus each image's canonical
    # caption against its twins in one softmax (NegCLIP-style), the binding signal that only
    # the fusion teacher saw before. Shipped as the set `shapes_negclip`.
    c.stages = ("teacher",)
    c.teacher.hard_columns = True
  if variant == "demo":
    c.teacher.weights = shipped.path("shapes", "teacher")
    c.fusion_teacher.weights = shipped.path("shapes", "fusion_teacher")
  if variant == "smoke":
    c.export.formats = ("fp32", "int8", "npu")
    c.export.reeval = ("fp32", "int8", "npu")
    c.export.representative_examples, c.export.parity_examples = 200, 64
    # 200 test images and a 60-step student: a few queries' flip is noise, not a regression
    # (4 queries = 2 R@1 points here). The demo's 5k test split keeps the 0.5-point floor.
    c.export.quant_r1_drop_queries = 4
  return c


# ----------------------------------------------------------------------------- paper-scale students
PAPER_VARIANTS = ("paper_t2", "paper_t4", "paper_t6")
VARIANTS = ("demo", "teachers", "teachers_negclip", "heldout", "smoke") + PAPER_VARIANTS


def paper_config(variant: str):
  """`shapes.py:paper_t2|t4|t6`: configs/coco.py's ViT-S/16 student (2-, 4- or 6-layer text) at
  224 px (the pipeline resizes the 64 px scenes), trained alone briefly so that the export stage
  calibrates int8 on real, not random, weights. For on-device costs at paper scale
  (benchmarks/mobile.py), not for accuracy:

    python -m mcad_jax.main --config=configs/shapes.py:paper_t2 --workdir=workdirs/paper_t2
  """
  from configs import coco

  c = get_config("demo")
  c.name = f"shapes:{variant}"
  c.stages = ("distill", "export")
  c.data.image_size = 224
  c.data.eval_limit = 500  # A ViT-S at 224 px embeds the full 5k test split slowly on a CPU.
  c.log_every, c.ckpt_every = 10, 100
  student = coco.paper_student(int(variant[-1]), dtype="float32")
  c.distill = cl.distill_stage_config(student, recipe="student_only", steps=60, batch_size=32,
                                      lr=3e-4, warmup_steps=6)
  c.export.formats = ("fp32", "fp16", "int8")
  c.export.reeval = ("fp32", "int8")
  c.export.representative_examples, c.export.parity_examples = 200, 64
  return c
