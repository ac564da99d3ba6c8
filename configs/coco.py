"""COCO Captions (Karpathy split) at paper scale, for TPU pods.

  python -m mcad_jax.main --config=configs/coco.py --workdir=/mnt/gcs/runs/coco   # every host

Stages: teacher (ViT-B/16 + B text, CLIP-style) -> fusion_teacher (4 B-wide
fusion layers on the frozen teacher) -> distill (MCAD student: ViT-S/16 + a
6-layer S text tower) -> export. Variant `teacher` runs the first stage only.
Train is Karpathy train + restval (113k images), test is the 5k Karpathy test
split scored COCO-5K style. TFDS's `coco_captions` must be prepared in
`data.data_dir` beforehand (it downloads from the COCO site, which this
project's own machines cannot reach). The workdir must be visible to every host
(launch/README.md).
"""

import copy

from mcad_jax import config_lib as cl

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def paper_scale(c, name: str, train_images: int, arg: str):
  """The stages and models shared by the COCO and Flickr30K configs."""
  c.name = name
  c.stages = ("teacher",) if arg == "teacher" else ("teacher", "fusion_teacher", "distill", "export")
  c.data.image_size = 224
  c.data.text_len = 64
  c.data.augment = True
  c.data.num_threads = 16
  c.data.prefetch = 8
  c.eval_batch_size = 1024
  c.log_every, c.ckpt_every, c.keep_ckpts = 50, 1000, 3
  batch = 1024
  steps = max(100, 30 * train_images // batch)  # ~30 epochs
  model = cl.model_config("B/16", "B", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16")
  c.teacher = cl.stage_config(model, steps=steps, batch_size=batch, lr=5e-4,
                              warmup_steps=max(1, steps // 10))
  c.teacher.optim.weight_decay = 0.2
  c.fusion_teacher = cl.fusion_stage_config(copy.deepcopy(model), towers_from="teacher",
                                            steps=steps // 3, batch_size=batch // 2, lr=1e-4,
                                            warmup_steps=max(1, steps // 30))
  c.fusion_teacher.fusion.update(dict(size="B", depth=4, context="tokens", twin_negatives=False))
  # The paper-scale student: ViT-S/16 image tower, 6-layer MiniLM-sized text tower.
  student = cl.model_config("S/16", "S", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16")
  student.text_kw = {"depth": 6}
  c.distill = cl.distill_stage_config(student, recipe="mcad", steps=steps, batch_size=batch,
                                      lr=5e-4, warmup_steps=max(1, steps // 10))
  c.distill.cache = False  # augment=True: teacher outputs differ per crop.
  c.export = cl.export_stage_config("distill")
  return c


def get_config(arg: str = ""):
  if arg not in ("", "teacher"):
    raise ValueError(f"unknown coco variant {arg!r}; use '' or 'teacher'")
  c = cl.base_config()
  c.data.tfds_name = "coco_captions/2014"
  c.data.train_split = "train+restval"
  c.data.test_split = "test"
  return paper_scale(c, "coco", 113_287, arg)
