"""The one train loop. Every stage (teacher, student, ...) runs through `train_stage`.

Read it top to bottom: mesh (given) -> data -> model and optimizer -> shapes by
`jax.eval_shape` -> shardings from those shapes -> `jax.jit(init,
out_shardings=...)` or restore -> donated update step -> loop with log /
checkpoint -> evaluation. What differs between stages is the loss function,
picked by config (see `make_loss_fn`), never a fork of this loop.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import zlib

import jax
import jax.numpy as jnp
import optax

from mcad_jax import checkpoint, evaluate, losses, metrics, sharding
from mcad_jax.data import pipeline
from mcad_jax.data.tokenizer import Tokenizer
from mcad_jax.models import two_tower

DONE_FILE = "done.json"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimizer


def _path_labels(params, fn):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(sharding.path_str(p), x), params)


def decay_mask(params):
  """Weight decay on matrices only: not on biases, norms, position tables or the scale."""
  return _path_labels(params, lambda name, x: x.ndim >= 2 and "pos_embedding" not in name)


def make_optimizer(scfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay, global-norm clipping and frozen params."""
  o = scfg.optim
  sched = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=scfg.steps, end_value=o.lr * o.end_lr_frac)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  if scfg.freeze:
    frozen = [re.compile(r) for r in scfg.freeze]
    labels = lambda params: _path_labels(  # noqa: E731
        params, lambda name, _: "frozen" if any(r.search(name) for r in frozen) else "train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, sched


# ----------------------------------------------------------------------------- losses


def make_loss_fn(model, scfg):
  """loss_fn(params, batch) -> (loss, {name: scalar}) for the stage's kind."""
  if scfg.kind == "dual":
    def loss_fn(params, batch):
      zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["text"])
      loss = losses.contrastive(scfg.loss, zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
      return loss, {f"loss/{scfg.loss}": loss, "logit_scale": aux["logit_scale"]}
    return loss_fn
  raise ValueError(f"unknown stage kind {scfg.kind!r}")


def _grads(loss_fn, params, batch, accum: int):
  """(loss, terms, grads), averaged over `accum` micro-batches.

  With accumulation, contrastive negatives come from each micro-batch only
  (B / accum of them), as in any accumulated contrastive training.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, terms), grads = vg(params, batch)
    return loss, terms, grads
  # Micro-batch k takes rows k, k+accum, ...: every device keeps its share of each.
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, mb):
    (loss, terms), grads = vg(params, mb)
    return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(vg, params, jax.tree.map(lambda x: x[0], micro)))
  (loss, terms), grads = zeros
  (loss, terms, grads), _ = jax.lax.scan(body, (loss, terms, grads), micro)
  return jax.tree.map(lambda x: x / accum, (loss, terms, grads))


def train_step(state, batch, *, loss_fn, tx, schedule, accum):
  """One optimizer update. `state` is donated by the caller's jit."""
  loss, terms, grads = _grads(loss_fn, state["params"], batch, accum)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  out = {"training_loss": loss, "lr": schedule(state["step"]),
         "l2_grads": optax.tree.norm(grads), "l2_params": optax.tree.norm(params), **terms}
  return {"params": params, "opt": opt, "step": state["step"] + 1}, out


# ----------------------------------------------------------------------------- stage


def stage_rng(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def build_model(config, scfg):
  tok = Tokenizer(config.data.text_len)
  return tok, two_tower.build(scfg.model, tok.vocab_size, config.data.text_len)


def dummy_batch(config, n: int = 1):
  s, L = config.data.image_size, config.data.text_len
  return {"image": jnp.zeros((n, s, s, 3), jnp.uint8), "text": jnp.zeros((n, L), jnp.int32)}


def abstract_state(config, scfg, mesh):
  """(init_fn, rng, sharded abstract state) for a stage, with no compute."""
  _, model = build_model(config, scfg)
  tx, _ = make_optimizer(scfg)
  d = dummy_batch(config)

  def init(rng):
    params = model.init(rng, d["image"], d["text"])["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  shapes = jax.eval_shape(init, jax.random.key(0))
  shard = sharding.tree_shardings(shapes, mesh, config.sharding_rules, config.shard_min_size)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shard)
  return init, shard, abstract


def read_done(stage_dir: str) -> dict | None:
  path = os.path.join(stage_dir, DONE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)  # Atomic: a reader never sees half a file.


def encoders(model):
  enc_img = lambda p, x: model.apply({"params": p}, x, method=model.encode_image)[0]  # noqa: E731
  enc_txt = lambda p, x: model.apply({"params": p}, x, method=model.encode_text)[0]  # noqa: E731
  return enc_img, enc_txt


def train_stage(config, name: str, workdir: str, mesh) -> dict:
  """Trains stage `name` to completion (resuming if cut off) and evaluates it.

  Returns the stage record: {"seconds", "steps", "retrieval": {...}}. A stage
  that finished before is not rerun; its record is read back.
  """
  stage_dir = os.path.join(workdir, name)
  done = read_done(stage_dir)
  if done is not None:
    log.info("Stage %s already finished; skipping.", name)
    return done
  os.makedirs(stage_dir, exist_ok=True)
  scfg = config[name]

  # Data and model.
  tok, model = build_model(config, scfg)
  seed = config.seed + zlib.crc32(name.encode()) % 10_000
  tx, schedule = make_optimizer(scfg)
  init, shard, abstract = abstract_state(config, scfg, mesh)

  # State: restore, else init (optionally from given weights).
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=config.keep_ckpts)
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    first_step, state, book = restored
    data_state, seconds0 = book["iter"], book["seconds"]
    log.info("Stage %s resumes from step %d.", name, first_step)
  else:
    first_step, data_state, seconds0 = 0, None, 0.0
    state = jax.jit(init, out_shardings=shard)(stage_rng(config.seed, name))
    if scfg.init_from:
      state["params"] = checkpoint.load_params(scfg.init_from, abstract["params"])
  data = pipeline.train_iterator(config.data, tok, scfg.batch_size, seed, data_state)

  # The update step: state donated, batch sharded, metrics replicated.
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=make_loss_fn(model, scfg), tx=tx,
                        schedule=schedule, accum=scfg.accum_steps),
      in_shardings=(shard, sharding.batch_sharding(mesh)),
      out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))

  writer = metrics.MetricWriter(os.path.join(stage_dir, "metrics.jsonl"))
  writer.truncate_after(first_step)
  progress = metrics.Progress(name, scfg.steps, first_step, scfg.batch_size)
  t_start = time.time()
  try:
    pending = None  # (step, loss) of the previous step: checked one step late to keep overlap.
    for step in range(first_step + 1, scfg.steps + 1):
      batch = sharding.to_global(next(data), mesh)
      state, m = step_fn(state, batch)
      if pending is not None:
        metrics.check_finite(pending[0], float(pending[1]))
      pending = (step, m["training_loss"])
      is_last = step == scfg.steps
      if step % config.log_every == 0 or is_last:
        host = jax.device_get(m)
        metrics.check_finite(step, float(host["training_loss"]))
        rate = progress.examples_per_sec(step)
        writer.write({"step": step, **host, "examples_per_sec": rate})
        progress.show(progress.line(step, float(host["training_loss"]), rate))
      if step % config.ckpt_every == 0 or is_last:
        # Never save a bad state: the loss and the updated params must both be finite.
        metrics.check_finite(step, float(m["training_loss"]))
        metrics.check_finite(step, float(m["l2_params"]))
        ckpt.save(step, state, {"iter": data.get_state(),
                                "seconds": seconds0 + time.time() - t_start})
  finally:
    ckpt.close()  # Lets a pending async save of a good state finish.
  seconds = seconds0 + time.time() - t_start

  # Evaluation on the test split.
  retrieval = evaluate_model(config, model, state["params"], mesh, tok)
  record = {"seconds": seconds, "steps": scfg.steps,
            "params": two_tower.param_count(state["params"]), "retrieval": retrieval}
  _write_json(os.path.join(stage_dir, DONE_FILE), record)
  return record


def evaluate_model(config, model, params, mesh, tok=None) -> dict:
  tok = tok or Tokenizer(config.data.text_len)
  test = pipeline.eval_set(config.data, tok, limit=config.data.eval_limit or None)
  enc_img, enc_txt = encoders(model)
  out, _, _ = evaluate.evaluate_dual(enc_img, enc_txt, params, test, mesh,
                                     batch_size=config.eval_batch_size)
  return out


def run_stages(config, workdir: str, mesh) -> dict:
  """Runs every configured stage in order; returns the results.json dict."""
  results = {"config": config.name, "stages": {}, "retrieval": {}, "hard_negatives": {}}
  for name in config.stages:
    rec = train_stage(config, name, workdir, mesh)
    results["stages"][name] = {"seconds": rec["seconds"], "steps": rec["steps"]}
    ret = dict(rec["retrieval"])
    hn = {k: ret.pop(k) for k in list(ret) if k.startswith("hn_")}
    results["retrieval"][name] = ret
    if hn:
      results["hard_negatives"][name] = hn
  _write_json(os.path.join(workdir, "results.json"), results)
  return results


def format_table(results: dict) -> str:
  """The retrieval table printed at the end of a run."""
  cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
  head = f"{'model':<16}" + "".join(f"{c:>9}" for c in cols) + f"{'hn_rel':>8}{'hn_attr':>8}"
  lines = [head, "-" * len(head)]
  for model, row in results["retrieval"].items():
    hn = results.get("hard_negatives", {}).get(model, {})
    lines.append(f"{model:<16}" + "".join(f"{row[c]:>9.1f}" for c in cols)
                 + "".join(f"{hn[k]:>8.1f}" if k in hn else f"{'-':>8}"
                           for k in ("hn_relation", "hn_attribute")))
  return "\n".join(lines)


__all__ = ["train_stage", "run_stages", "format_table", "make_optimizer", "make_loss_fn",
           "train_step", "abstract_state"]


def compiled_init(config, name: str, mesh):
  """The stage's sharded init, compiled but not run (for memory checks)."""
  init, shard, _ = abstract_state(config, config[name], mesh)
  return jax.jit(init, out_shardings=shard).lower(jax.random.key(0)).compile()


def state_bytes_per_device(config, name: str, mesh) -> int:
  """Per-device bytes of params + optimizer state, from XLA's memory analysis."""
  return int(compiled_init(config, name, mesh).memory_analysis().output_size_in_bytes)
