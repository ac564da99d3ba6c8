"""COCO Captions (Karpathy split) at paper scale, for TPU pods.

  python -m mcad_jax.main --config=configs/coco.py --workdir=/mnt/gcs/runs/coco   # every host

Stages: teacher (ViT-B/16 + B text, CLIP-style) -> fusion_teacher (4 B-wide
fusion layers on the frozen teacher) -> distill (MCAD student: ViT-S/16 + a
6-layer S text tower) -> export. Variant `teacher` runs the first stage only;
`t2`, `t4`, `t6` pick the student's text depth (ConaCLIP's students; `t6` is the
default).

Variant `pretrained`: MCAD from pretrained models, three tokenizers in one run:

  python -m mcad_jax.main --config=configs/coco.py:pretrained --workdir=W \
    --config.teacher.pretrained=openclip:/ckpt/open_clip_vit_b16.safetensors \
    --config.fusion_teacher.pretrained=blip:/ckpt/blip-itm-base-coco/model.safetensors \
    --config.fusion_teacher.model.tokenizer=wordpiece:/ckpt/blip-itm-base-coco/tokenizer.json

- teacher: an open_clip ViT-B/16 (exact GELU: not the QuickGELU OpenAI weights), CLIP's BPE,
  77 tokens, fine-tuned briefly at a low learning rate;
- fusion_teacher: BLIP's image-text matching model (`fusion.arch='blip'`), its own WordPiece
  (BERT-uncased + [DEC]/[ENC], 30524 ids; the checkpoint's tokenizer.json or vocab.txt), 35
  tokens, trained on ITM briefly;
- distill: a ViT-S/16 student with the MiniLM-L6 text tower (`minilm-l6`, or
  `--config.distill.pretrained=bert:PATH`), BERT-uncased WordPiece, 32 tokens.
All at 224 px; a BLIP checkpoint trained at 384 px needs its position table resized first.
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


# ConaCLIP's released students: a ViT-S/16 image tower at 224 px with a 2-, 4- or 6-layer text
# tower (MiniLM-sized: 384 wide). The MobileCLIP-S0 image tower is a conv/attention hybrid
# (MCi0) that the ViT model code does not build, so it has no variant here.
STUDENT_VARIANTS = ("t2", "t4", "t6")


def paper_student(text_layers: int = 6, dtype: str = "bfloat16"):
  """ViT-S/16 image tower + S-wide text tower of `text_layers` layers, 512-d embeddings."""
  student = cl.model_config("S/16", "S", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype=dtype)
  student.text_kw = {"depth": text_layers}
  return student


def paper_scale(c, name: str, train_images: int, arg: str):
  """The stages and models shared by the COCO and Flickr30K configs."""
  c.name = name
  c.stages = {"teacher": ("teacher",)}.get(arg, ("teacher", "fusion_teacher", "distill", "export"))
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
  c.teacher = cl.dual_stage_config(model, steps=steps, batch_size=batch, lr=5e-4,
                                   warmup_steps=max(1, steps // 10))
  c.teacher.optim.weight_decay = 0.2
  c.fusion_teacher = cl.fusion_stage_config(copy.deepcopy(model), towers_from="teacher",
                                            steps=steps // 3, batch_size=batch // 2, lr=1e-4,
                                            warmup_steps=max(1, steps // 30))
  c.fusion_teacher.fusion.update(dict(size="B", depth=4, context="tokens", twin_negatives=False))
  # The paper-scale student: ViT-S/16 image tower, 6-layer MiniLM-sized text tower (variants
  # `t2` and `t4`: ConaCLIP's 2- and 4-layer text towers).
  student = paper_student(int(arg[1:]) if arg in STUDENT_VARIANTS else 6)
  c.distill = cl.distill_stage_config(student, recipe="mcad", steps=steps, batch_size=batch,
                                      lr=5e-4, warmup_steps=max(1, steps // 10))
  c.distill.cache = False  # augment=True: teacher outputs differ per crop.
  c.export = cl.export_stage_config("distill")
  return c


def pretrained(c):
  """The `pretrained` variant's stages: open_clip teacher, BLIP fusion teacher, MiniLM student."""
  steps = 2000
  clip = cl.model_config(
      "B/16", "M", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16", tokenizer="clip", text_len=77,
      image_kw=dict(pool="tok", ln_pre=True, ln_eps=1e-5, gelu_exact=True),
      text_kw=dict(causal=True, pool="eot", ln_eps=1e-5, gelu_exact=True))
  c.teacher = cl.dual_stage_config(clip, steps=steps, batch_size=512, lr=1e-5, warmup_steps=100)
  c.teacher.pretrained = ""  # openclip:PATH (required)
  blip = cl.model_config("B/16", "B", 256, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16",
                         tokenizer="wordpiece", text_len=35, text_kw=dict(vocab_size=30524))
  c.fusion_teacher = cl.fusion_stage_config(blip, towers_from="", steps=steps // 2, batch_size=256,
                                            lr=1e-5, warmup_steps=50)
  c.fusion_teacher.fusion.update(dict(arch="blip", freeze_towers=False, twin_negatives=False,
                                      itc_weight=0.0))
  c.fusion_teacher.pretrained = ""  # blip:PATH (required)
  student = cl.model_config("S/16", "S", 512, mean=CLIP_MEAN, std=CLIP_STD, dtype="bfloat16",
                            tokenizer="wordpiece", text_len=32, text_kw=cl.minilm_text_kw())
  c.distill = cl.distill_stage_config(student, recipe="mcad", steps=steps * 5, batch_size=512,
                                      lr=5e-4, warmup_steps=500)
  c.distill.pretrained = "minilm-l6"
  c.distill.cache = False
  c.export = cl.export_stage_config("distill")
  return c


def get_config(arg: str = ""):
  if arg not in ("", "teacher", "pretrained", *STUDENT_VARIANTS):
    raise ValueError(f"unknown coco variant {arg!r}; use '', 'teacher', 'pretrained' or one of "
                     f"{STUDENT_VARIANTS}")
  c = cl.base_config()
  c.data.tfds_name = "coco_captions/2014"
  c.data.train_split = "train+restval"
  c.data.test_split = "test"
  c = paper_scale(c, "coco", 113_287, "" if arg == "pretrained" else arg)
  if arg == "pretrained":
    c.name = "coco:pretrained"
    c = pretrained(c)
  return c
