"""What every stage kind shares: the `Stage` record the train loop reads, and model helpers.

The train loop (`train.py`) is the same for every stage; a `Stage` tells it what
differs. Each stage kind builds one in its own module (`dual.py`, `fusion.py`,
`distill.py`); this module holds what they all use: the tokenizer, model
construction from config, checkpoint lookup and the dual-encoder evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mcad_jax import checkpoint, evaluate
from mcad_jax.data import pipeline, tokenizer as tokenizers
from mcad_jax.data.tokenizer import Tokenizer
from mcad_jax.models import two_tower

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
  """Everything the train loop needs to know about one stage.

  Attributes:
    init: rng -> params (pure; jitted with sharded outputs).
    loss_fn: (params, batch, rng, frozen, step=None) -> (loss, {name: scalar}); `step` is the
      optimizer step (traced), for schedules inside the loss.
    evaluate: (params, mesh) -> {results row name: metrics}.
    frozen: arrays every step reads but never updates (teacher params), or None.
    load_init: host-side params -> params, run once after a fresh init (e.g. to
      copy in the dual towers), or None.
    update_mask: (step, params) -> pytree of 0/1 multipliers on the updates, or None.
    batch_keys: which batch fields the loss reads.
    host_fn: numpy batch -> numpy batch, run on the host before sharding (e.g. the
      teacher-output cache lookup), or None.
    freeze: regexes of param paths the optimizer must leave alone (no update, no decay),
      on top of the config's `freeze`.
    tokenizer: the stage's own model's tokenizer (batch key `text`); None: the run's default.
    extra_tokenizers: the teachers' tokenizers, whose ids batches also carry
      (`pipeline.ids_key('text', tok)`).
  """

  init: Callable[[jax.Array], Any]
  loss_fn: Callable
  evaluate: Callable
  frozen: Any = None
  load_init: Callable | None = None
  update_mask: Callable | None = None
  batch_keys: tuple[str, ...] = ("image", "text")
  host_fn: Callable | None = None
  freeze: tuple[str, ...] = ()
  tokenizer: Tokenizer | None = None
  extra_tokenizers: tuple[Tokenizer, ...] = ()


def tokenizer(config, model_cfg=None) -> Tokenizer:
  """The tokenizer of a model config (its `tokenizer` / `text_len`), else the run's default."""
  if model_cfg is None:
    return tokenizers.for_data(config.data)
  return tokenizers.for_model(config.data, model_cfg)


def dual_model(config, model_cfg) -> two_tower.TwoTower:
  tok = tokenizer(config, model_cfg)
  return two_tower.build(model_cfg, tok.vocab_size, tok.max_len)


def dummy_batch(config, n: int = 1, model_cfg=None):
  s, L = config.data.image_size, tokenizer(config, model_cfg).max_len
  return jnp.zeros((n, s, s, 3), jnp.uint8), jnp.zeros((n, L), jnp.int32)


def checkpoint_dir(config, workdir: str, ref: str) -> str:
  """A stage name -> its checkpoint dir: its given `weights`, else its dir in the workdir."""
  return config[ref].get("weights") or os.path.join(workdir, ref, "checkpoints")


def restore_params(config, workdir: str, ref: str, abstract_params):
  """Params of stage/dir `ref`, laid out like `abstract_params` (sharded structs)."""
  return checkpoint.load_params(checkpoint_dir(config, workdir, ref), abstract_params)


def abstract_params(init, mesh, config, rng=None):
  from mcad_jax import sharding

  shapes = jax.eval_shape(init, jax.random.key(0) if rng is None else rng)
  shard = sharding.tree_shardings(shapes, mesh, config.sharding_rules, config.shard_min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shard)


def encoders(model) -> tuple[Callable, Callable]:
  enc_img = lambda p, x: model.apply({"params": p}, x, method=model.encode_image)[0]
  enc_txt = lambda p, x: model.apply({"params": p}, x, method=model.encode_text)[0]
  return enc_img, enc_txt


def pretrained_init(config, scfg, model, under: str | None = None) -> Callable | None:
  """load_init that copies `scfg.pretrained` weights (mcad_jax/convert.py) into a fresh init.

  `under` names the subtree holding the two-tower model (the distill stage's 'student').
  """
  spec = scfg.get("pretrained", "")
  if not spec:
    return None

  def load(params):
    from mcad_jax import convert

    name, new = convert.load_pretrained(spec, model.text["max_len"], model.text["heads"])
    log.info("Stage params %s from pretrained %s.", name or "(all)", spec)
    if under:
      return {**params, under: convert.graft(params[under], name, new)}
    return convert.graft(params, name, new)

  return load


def eval_dual(config, model, params, mesh, row: str, model_cfg=None) -> dict:
  """Retrieval of a two-tower model on the test split, with its own tokenizer."""
  test = pipeline.eval_set(config.data, tokenizer(config, model_cfg),
                           limit=config.data.eval_limit or None)
  enc_img, enc_txt = encoders(model)
  out, _, _ = evaluate.evaluate_dual(enc_img, enc_txt, params, test, mesh,
                                     batch_size=config.eval_batch_size)
  return {row: out}


def teacher_scale(frozen):
  """The dual teacher's logit scale, clipped as TwoTower clips it."""
  return jnp.minimum(jnp.exp(frozen["dual"]["log_scale"]), two_tower.TwoTower.max_logit_scale)
