"""Shapes: the built-in synthetic benchmark, whole pipeline on a laptop CPU.

Variants:
  python -m mcad_jax.main --config=configs/shapes.py --workdir=workdirs/shapes        # demo
  python -m mcad_jax.main --config=configs/shapes.py:smoke --workdir=workdirs/smoke   # < 3 min
"""

from mcad_jax import config_lib as cl


def get_config(arg: str = ""):
  variant = arg or "demo"
  c = cl.base_config()
  c.name = f"shapes:{variant}"
  c.stages = ("teacher",)
  if variant == "demo":
    c.data.tfds_name = "shapes/default"
    c.data.image_size, c.data.text_len = 64, 24
    # 16 px patches on a 4x4 object grid: one object per patch at most.
    c.teacher = cl.stage_config(cl.model_config("nano/16", "mu", 128),
                                steps=1500, batch_size=128, lr=1e-3, warmup_steps=100)
    c.log_every, c.ckpt_every = 50, 250
  elif variant == "smoke":
    c.data.tfds_name = "shapes/tiny"
    c.data.image_size, c.data.text_len = 32, 16
    c.teacher = cl.stage_config(cl.model_config("mu/8", "mu", 64),
                                steps=60, batch_size=64, lr=2e-3, warmup_steps=10)
    c.log_every, c.ckpt_every = 10, 30
  else:
    raise ValueError(f"unknown shapes variant {variant!r}; use '', 'demo' or 'smoke'")
  return c
