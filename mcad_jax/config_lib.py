"""Config building blocks and validation.

Config files in `configs/` are `get_config(arg)` functions that start from
`base_config()` and fill in stages. `validate()` runs before any compute and
raises `ConfigError` naming the offending key; `main` turns that into exit 2.
"""

from __future__ import annotations

import ml_collections

STAGE_KINDS = ("dual",)
LOSSES = ("infonce", "sigmoid")
DTYPES = ("float32", "bfloat16")
POOLS = ("gap", "tok")


class ConfigError(ValueError):
  """A bad config key or value. `key` is the dotted path."""

  def __init__(self, key: str, msg: str):
    super().__init__(f"config error at '{key}': {msg}")
    self.key = key


def model_config(image: str, text: str, embed_dim: int, **kw) -> ml_collections.ConfigDict:
  """A dual-encoder model: image 'SIZE/PATCH', text 'SIZE' (see models/two_tower.SIZES)."""
  c = ml_collections.ConfigDict()
  c.image = image
  c.text = text
  c.embed_dim = embed_dim
  c.pool = "gap"
  c.mean = (0.5, 0.5, 0.5)
  c.std = (0.5, 0.5, 0.5)
  c.init_temperature = 0.07
  c.dtype = "float32"
  # Overrides of the size presets, e.g. {"depth": 2}.
  c.image_kw = ml_collections.ConfigDict()
  c.text_kw = ml_collections.ConfigDict()
  c.update(kw)
  return c


def stage_config(model: ml_collections.ConfigDict, *, steps: int, batch_size: int, lr: float,
                 warmup_steps: int = 100, **kw) -> ml_collections.ConfigDict:
  """One training stage: what to train, on what loss, for how long."""
  c = ml_collections.ConfigDict()
  c.kind = "dual"
  c.model = model
  c.loss = "infonce"
  c.batch_size = batch_size
  c.steps = steps
  c.accum_steps = 1
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup_steps, end_lr_frac=0.01, weight_decay=0.05, b1=0.9, b2=0.98,
      clip_norm=1.0))
  # Params whose path matches any of these regexes get no updates.
  c.freeze = ()
  # Start from these params instead of random init: a checkpoint directory.
  c.init_from = ""
  c.update(kw)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.seed = 0
  c.stages = ("teacher",)
  c.data = ml_collections.ConfigDict(dict(
      tfds_name="shapes/default",
      data_dir="",           # '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      image_size=64,
      text_len=24,
      train_split="train",
      test_split="test",
      augment=False,         # Random crops; off for shapes, where position is meaning.
      num_threads=2,
      prefetch=4,
      eval_limit=0,          # 0 = the whole test split.
  ))
  c.mesh = (("data", 1), ("fsdp", -1))
  c.sharding_rules = ((".*", "fsdp"),)
  c.shard_min_size = 2**14
  c.log_every = 50
  c.ckpt_every = 500
  c.keep_ckpts = 3
  c.eval_batch_size = 512
  return c


def _need(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(key, msg)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that the type system cannot; raises ConfigError."""
  from mcad_jax.data import pipeline
  from mcad_jax.models import two_tower

  _need(len(config.stages) > 0, "stages", "no stages to run")
  for k in ("log_every", "ckpt_every", "keep_ckpts", "eval_batch_size"):
    _need(config[k] > 0, k, f"must be > 0, got {config[k]}")
  try:
    pipeline.adapter(config.data.tfds_name)
  except ValueError as e:
    raise ConfigError("data.tfds_name", str(e)) from None
  _need(config.data.image_size > 0, "data.image_size", "must be > 0")
  _need(config.data.text_len >= 2, "data.text_len", "must be >= 2 ([CLS] and [SEP])")
  _need(config.data.num_threads >= 0, "data.num_threads", "must be >= 0")
  names = tuple(n for n, _ in config.mesh)
  _need(names == ("data", "fsdp"), "mesh", f"axes must be ('data', 'fsdp'), got {names}")
  for name in config.stages:
    _need(name in config, "stages", f"stage {name!r} has no config section")
    s = config[name]
    _need(s.kind in STAGE_KINDS, f"{name}.kind", f"unknown kind {s.kind!r}; known {STAGE_KINDS}")
    _need(s.loss in LOSSES, f"{name}.loss", f"unknown loss {s.loss!r}; known {LOSSES}")
    _need(s.steps > 0, f"{name}.steps", f"must be > 0, got {s.steps}")
    _need(s.batch_size > 0, f"{name}.batch_size", f"must be > 0, got {s.batch_size}")
    _need(s.accum_steps > 0 and s.batch_size % s.accum_steps == 0, f"{name}.accum_steps",
          f"must be > 0 and divide batch_size {s.batch_size}, got {s.accum_steps}")
    _need(s.optim.lr > 0, f"{name}.optim.lr", f"must be > 0, got {s.optim.lr}")
    _need(0 <= s.optim.warmup_steps < s.steps, f"{name}.optim.warmup_steps",
          f"must be in [0, steps={s.steps}), got {s.optim.warmup_steps}")
    m = s.model
    for key in ("image", "text"):
      try:
        two_tower.size_kwargs(m[key])
      except ValueError as e:
        raise ConfigError(f"{name}.model.{key}", str(e)) from None
    _need("/" in m.image, f"{name}.model.image", f"must be 'SIZE/PATCH', got {m.image!r}")
    patch = int(m.image.split("/")[1])
    _need(config.data.image_size % patch == 0, f"{name}.model.image",
          f"patch {patch} does not divide data.image_size {config.data.image_size}")
    _need(m.dtype in DTYPES, f"{name}.model.dtype", f"unknown dtype {m.dtype!r}; known {DTYPES}")
    _need(m.pool in POOLS, f"{name}.model.pool", f"unknown pool {m.pool!r}; known {POOLS}")
    _need(m.embed_dim > 0, f"{name}.model.embed_dim", "must be > 0")
