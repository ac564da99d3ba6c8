"""COCO Captions (Karpathy split) at paper scale, for TPU pods.

  python -m mcad_jax.main --config=configs/coco.py --workdir=gs://BUCKET/mcad/coco

Train is Karpathy train + restval (113k images), test is the 5k Karpathy test
split scored COCO-5K style. TFDS's `coco_captions` must be prepared in
`data.data_dir` beforehand (it downloads from the COCO site, which this
project's own machines cannot reach).
"""

from mcad_jax import config_lib as cl

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg: str = ""):
  del arg
  c = cl.base_config()
  c.name = "coco"
  c.stages = ("teacher",)
  c.data.tfds_name = "coco_captions/2014"
  c.data.train_split = "train+restval"
  c.data.test_split = "test"
  c.data.image_size = 224
  c.data.text_len = 64
  c.data.augment = True
  c.data.num_threads = 16
  c.data.prefetch = 8
  c.eval_batch_size = 1024
  c.log_every, c.ckpt_every, c.keep_ckpts = 50, 1000, 3
  model = cl.model_config("B/16", "B", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16")
  # ~30 epochs of 113k images at batch 1024.
  c.teacher = cl.stage_config(model, steps=3300, batch_size=1024, lr=5e-4, warmup_steps=300)
  c.teacher.optim.weight_decay = 0.2
  # The paper-scale student: ViT-S/16 image tower, 6-layer MiniLM-sized text tower.
  c.student_model = cl.model_config("S/16", "S", 512, mean=CLIP_MEAN, std=CLIP_STD,
                                    dtype="bfloat16")
  c.student_model.text_kw = {"depth": 6}
  return c
