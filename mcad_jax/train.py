"""The one train loop. Every stage (teacher, fusion teacher, student) runs through `train_stage`.

Read it top to bottom: mesh (given) -> stage (loss, init, frozen teachers) ->
data -> optimizer -> shapes by `jax.eval_shape` -> shardings from those shapes
-> `jax.jit(init, out_shardings=...)` or restore -> donated update step -> loop
with log / checkpoint -> evaluation. What differs between stages comes from
`stages.build` (config switches and loss functions), never from a fork of this
loop. Frozen teachers enter the step as an argument: never optimized, never in
the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import zlib

import jax
import jax.numpy as jnp
import optax

from mcad_jax import checkpoint, fileio, metrics, preemption, sharding, stages
from mcad_jax.data import pipeline

DONE_FILE = "done.json"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimizer


def _path_labels(params, fn):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(sharding.path_str(p), x), params)


def decay_mask(params):
  """Weight decay on matrices only: not on biases, norms, position tables or the scale."""
  return _path_labels(params, lambda name, x: x.ndim >= 2 and "pos_embedding" not in name)


def make_optimizer(scfg, freeze: tuple[str, ...] = ()) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  """AdamW with linear warmup + cosine decay, global-norm clipping and frozen params.

  Params matching `scfg.freeze` or `freeze` get no update at all (not even weight decay).
  """
  o = scfg.optim
  sched = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=scfg.steps, end_value=o.lr * o.end_lr_frac)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  patterns = tuple(scfg.freeze) + tuple(freeze)
  if patterns:
    frozen = [re.compile(r) for r in patterns]
    labels = lambda params: _path_labels(
        params, lambda name, _: "frozen" if any(r.search(name) for r in frozen) else "train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, sched


# ----------------------------------------------------------------------------- step


def _grads(loss_fn, params, batch, rng, frozen, accum: int):
  """(loss, terms, grads), averaged over `accum` micro-batches.

  With accumulation, contrastive negatives come from each micro-batch only
  (B / accum of them), as in any accumulated contrastive training.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, terms), grads = vg(params, batch, rng, frozen)
    return loss, terms, grads
  # Micro-batch k takes rows k, k+accum, ...: every device keeps its share of each.
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)
  rngs = jax.random.split(rng, accum)

  def body(carry, xs):
    mb, r = xs
    (loss, terms), grads = vg(params, mb, r, frozen)
    return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  (loss, terms), grads = jax.tree.map(jnp.zeros_like,
                                      jax.eval_shape(vg, params, first, rngs[0], frozen))
  (loss, terms, grads), _ = jax.lax.scan(body, (loss, terms, grads), (micro, rngs))
  return jax.tree.map(lambda x: x / accum, (loss, terms, grads))


def train_step(state, batch, frozen, *, loss_fn, tx, schedule, accum, base_rng, update_mask=None):
  """One optimizer update. `state` is donated by the caller's jit; `frozen` is read only."""
  rng = jax.random.fold_in(base_rng, state["step"])
  # The step reaches the loss for schedules inside it (e.g. a curriculum).
  loss_fn = functools.partial(loss_fn, step=state["step"])
  loss, terms, grads = _grads(loss_fn, state["params"], batch, rng, frozen, accum)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  if update_mask is not None:
    updates = jax.tree.map(jnp.multiply, updates, update_mask(state["step"], updates))
  params = optax.apply_updates(state["params"], updates)
  out = {"training_loss": loss, "lr": schedule(state["step"]),
         "l2_grads": optax.tree.norm(grads), "l2_params": optax.tree.norm(params), **terms}
  return {"params": params, "opt": opt, "step": state["step"] + 1}, out


# ----------------------------------------------------------------------------- stage


def stage_rng(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def abstract_state(stage: stages.Stage, scfg, config, mesh):
  """(init_fn, shardings, sharded abstract state) for a stage, with no compute."""
  tx, _ = make_optimizer(scfg, stage.freeze)

  def init(rng):
    params = stage.init(rng)
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  shapes = jax.eval_shape(init, jax.random.key(0))
  shard = sharding.tree_shardings(shapes, mesh, config.sharding_rules, config.shard_min_size)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shard)
  return init, shard, abstract


def read_done(stage_dir: str) -> dict | None:
  return fileio.read_json(os.path.join(stage_dir, DONE_FILE))


def write_json(path: str, obj) -> None:
  if jax.process_index() == 0:  # One writer; atomic, so a reader never sees half a file.
    fileio.write_json(path, obj)


def _select(batch: dict, keys) -> dict:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"the input pipeline gives no {missing}; check the data config")
  return {k: batch[k] for k in keys}


def train_stage(config, name: str, workdir: str, mesh) -> dict:
  """Trains stage `name` to completion (resuming if cut off) and evaluates it.

  Returns the stage record: {"seconds", "steps", "params", "retrieval": {row: metrics}}.
  A stage that finished before is not rerun; its record is read back. A stage
  with `weights` set is not trained: those weights are evaluated.
  """
  stage_dir = os.path.join(workdir, name)
  done = read_done(stage_dir)
  if done is not None:
    log.info("Stage %s already finished; skipping.", name)
    return done
  os.makedirs(stage_dir, exist_ok=True)
  scfg = config[name]
  t_start = time.time()

  # What this stage trains, with its frozen teachers loaded.
  stage = stages.build(config, name, workdir, mesh)
  tx, schedule = make_optimizer(scfg, stage.freeze)
  init, shard, abstract = abstract_state(stage, scfg, config, mesh)

  if scfg.get("weights"):
    log.info("Stage %s uses given weights %s; not training.", name, scfg.weights)
    params = checkpoint.load_params(scfg.weights, abstract["params"])
    return _finish(stage_dir, stage, params, mesh, 0, time.time() - t_start)

  # State: restore, else init (then copy in anything the stage starts from).
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
    if stage.load_init is not None:
      state["params"] = stage.load_init(state["params"])
  seed = config.seed + zlib.crc32(name.encode()) % 10_000
  data = pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config),
                                 scfg.batch_size, seed, data_state, extra=stage.extra_tokenizers)

  # The update step: state donated, batch sharded, teachers as they were restored.
  frozen_sh = jax.tree.map(lambda x: x.sharding, stage.frozen)
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=stage.loss_fn, tx=tx, schedule=schedule,
                        accum=scfg.accum_steps, base_rng=stage_rng(config.seed + 1, name),
                        update_mask=stage.update_mask),
      in_shardings=(shard, sharding.batch_sharding(mesh), frozen_sh),
      out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))

  writer = metrics.MetricWriter(os.path.join(stage_dir, "metrics.jsonl"),
                                os.path.join(stage_dir, "tensorboard"))
  writer.truncate_after(first_step)
  progress = metrics.Progress(name, scfg.steps, first_step, scfg.batch_size)
  t_loop = time.time()
  watcher = preemption.Watcher()
  finished = False
  try:
    pending = None  # (step, loss) of the previous step: checked one step late to keep overlap.
    for step in range(first_step + 1, scfg.steps + 1):
      batch = next(data)
      if stage.host_fn is not None:
        batch = stage.host_fn(batch)
      batch = sharding.to_global(_select(batch, stage.batch_keys), mesh)
      state, m = step_fn(state, batch, stage.frozen)
      ckpt.poll()  # A failed background save stops the run now, not at the next save.
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
      stop = watcher.should_stop(step) and not is_last
      if step % config.ckpt_every == 0 or is_last or stop:
        # Never save a bad state: the loss and the updated params must both be finite.
        metrics.check_finite(step, float(m["training_loss"]))
        metrics.check_finite(step, float(m["l2_params"]))
        ckpt.save(step, state, {"iter": data.get_state(),
                                "seconds": seconds0 + time.time() - t_loop}, force=stop)
      if stop:
        ckpt.wait()  # The save of this step must succeed (or say why) before we report it.
        raise preemption.Preempted(step)
    finished = True
  finally:
    watcher.close()
    writer.close()
    # Lets a pending async save of a good state finish; if it fails, a finished loop says so,
    # while a loop already failing keeps its own error.
    ckpt.close(check=finished)
  return _finish(stage_dir, stage, state["params"], mesh, scfg.steps,
                 seconds0 + time.time() - t_loop)


def _finish(stage_dir, stage, params, mesh, steps, seconds) -> dict:
  from mcad_jax.models.two_tower import param_count

  record = {"seconds": seconds, "steps": steps, "params": param_count(params),
            "retrieval": stage.evaluate(params, mesh)}
  write_json(os.path.join(stage_dir, DONE_FILE), record)
  return record


def compiled_init(config, name: str, mesh):
  """The stage's sharded init, compiled but not run (for memory checks)."""
  stage = stages.build(config, name, "", mesh)
  init, shard, _ = abstract_state(stage, config[name], config, mesh)
  return jax.jit(init, out_shardings=shard).lower(jax.random.key(0)).compile()


def state_bytes_per_device(config, name: str, mesh) -> int:
  """Per-device bytes of params + optimizer state, from XLA's memory analysis."""
  return int(compiled_init(config, name, mesh).memory_analysis().output_size_in_bytes)
