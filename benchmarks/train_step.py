"""Train-step throughput, an MFU ratio on this machine, and state memory vs mesh size.

  python -m benchmarks.train_step [--config=configs/shapes.py] [--steps=30] [--write]
  python -m benchmarks.train_step --config=configs/coco.py --dtype=bfloat16 --batch 128 256 512 \
      --matmul-n=8192   # on a GPU: the largest batch that fits is the last row that is not OOM

Measured in one run:
- examples/s of the jitted, donated train step on one device, on a fixed
  synthetic batch of every field the stage reads (the input pipeline is not timed);
- achieved FLOP/s (XLA's cost analysis of the step / wall time) divided by the
  FLOP/s of a large f32 matmul timed in the same run: an MFU ratio for this CPU;
- the step's device memory (arguments + temporaries + outputs, from
  `compiled.memory_analysis()` of the step), per batch size;
- per-device params + optimizer bytes of the sharded init, from
  `compiled.memory_analysis()`, on meshes of 1, 2, 4 and 8 (fake CPU) devices,
  for the config's teacher and for configs/coco.py's ViT-B/16 teacher (compiled,
  never run).

With --write the table replaces the section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mcad_jax import sharding, stages, train  # noqa: E402


def load_config(spec: str):
  from mcad_jax import config_lib

  return config_lib.load_file(spec)


def matmul_flops_per_sec(n: int = 2048, reps: int = 10, dtype: str = "float32") -> float:
  """Best-of-reps FLOP/s of an n x n x n matmul in `dtype` on device 0 (the MFU denominator: a
  GPU's bf16 peak is measured, not taken from its data sheet)."""
  # Random operands: a matmul of constants can run faster than one of real data.
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), jax.devices()[0])
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def matmul_flops(closed_jaxpr) -> float:
  """FLOPs of every dot_general and convolution in a jaxpr (2 per multiply-add), sub-jaxprs and
  scan bodies included. XLA's cost analysis misses the matmuls it hands to cuBLAS on a GPU, so
  the MFU numerator is counted here, the same way on every backend (rematerialised forward
  passes count too: these are the FLOPs the hardware does)."""
  from jax.extend import core as jcore

  def subs(v):
    if isinstance(v, jcore.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jcore.Jaxpr):
      yield v
    elif isinstance(v, (tuple, list)):
      for x in v:
        yield from subs(x)

  def walk(jaxpr, mult: float) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        total += 2.0 * mult * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lc)
      elif name == "conv_general_dilated":
        rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
        out_feat = eqn.params["dimension_numbers"].rhs_spec[0]
        total += 2.0 * mult * math.prod(out.shape) * math.prod(rhs.shape) / rhs.shape[out_feat]
      inner = mult * (eqn.params.get("length", 1) if name == "scan" else 1)
      branches = list(subs(eqn.params.get("branches", ())))
      if branches:  # cond: one branch runs; count the costliest.
        total += max(walk(b, inner) for b in branches)
        continue
      for v in eqn.params.values():
        for sub in subs(v):
          total += walk(sub, inner)
    return total

  return walk(closed_jaxpr.jaxpr, 1.0)


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def synthetic_batch(config, stage, b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A random batch of every field the stage reads: pixels, ids in the tokenizer each key names
  (`text@<name>`: a teacher's own), and validity flags of the hard columns."""
  own = stage.tokenizer or stages.tokenizer(config)
  toks = {t.name: t for t in stage.extra_tokenizers}
  s = config.data.image_size
  out = {}
  for k in stage.batch_keys:
    if k == "image":
      out[k] = rng.integers(0, 255, (b, s, s, 3)).astype(np.uint8)
    elif k.endswith("_valid"):
      out[k] = np.ones(b, bool)
    elif k.startswith("teacher_"):
      raise ValueError(f"the stage reads the teacher cache ({k}): pass a real batch instead")
    else:
      tok = toks.get(k.partition("@")[2], own)
      ids = rng.integers(1000, min(3000, tok.vocab_size), (b, tok.max_len)).astype(np.int32)
      ids[:, 0] = tok.cls_id
      out[k] = ids
  return out


def step_throughput(config, name: str, steps: int, batch: dict | None = None, stage=None,
                    mesh=None) -> dict:
  """Examples/s, FLOPs and memory of stage `name`'s jitted, donated train step on one device,
  on a fixed batch: `batch` (a real host batch) or a synthetic one."""
  scfg = config[name]
  mesh = mesh or sharding.make_mesh(config.mesh, jax.devices()[:1])
  stage = stage or stages.build(config, name, "", mesh)
  tx, sched = train.make_optimizer(scfg, stage.freeze)
  init, shard, _ = train.abstract_state(stage, scfg, config, mesh)
  state = jax.jit(init, out_shardings=shard)(jax.random.key(0))
  b = scfg.batch_size
  if batch is None:
    batch = synthetic_batch(config, stage, b, np.random.default_rng(0))
  batch = sharding.to_global({k: batch[k] for k in stage.batch_keys}, mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, stage.frozen)
  fn = jax.jit(functools.partial(train.train_step, loss_fn=stage.loss_fn, tx=tx, schedule=sched,
                                 accum=scfg.accum_steps, base_rng=jax.random.key(0),
                                 update_mask=stage.update_mask),
               in_shardings=(shard, sharding.batch_sharding(mesh), frozen_sh),
               out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))
  try:
    compiled = fn.lower(state, batch, stage.frozen).compile()
  except Exception as e:  # noqa: BLE001 - XLA reports OOM at compile time as several types.
    if _is_oom(e):
      return {"batch": b, "oom": True}
    raise
  mem = compiled.memory_analysis()
  step_bytes = sum(getattr(mem, k, 0) or 0 for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")) - (
      getattr(mem, "alias_size_in_bytes", 0) or 0)
  counted = matmul_flops(jax.make_jaxpr(fn)(state, batch, stage.frozen))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  try:
    for _ in range(3):  # Warm-up.
      state, m = compiled(state, batch, stage.frozen)
    jax.block_until_ready(m)
  except Exception as e:  # noqa: BLE001
    if _is_oom(e):
      return {"batch": b, "oom": True}
    raise
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch, stage.frozen)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / steps
  return {"batch": b, "step_s": dt, "examples_per_s": b / dt, "flops_per_step": counted,
          "xla_flops_per_step": flops, "achieved_flops": counted / dt, "step_bytes": step_bytes}


def memory_by_mesh(config, name: str) -> dict[int, int]:
  out = {}
  cpus = jax.devices("cpu")  # Compiled, never run: the 8 fake CPU devices, also on a GPU host.
  for n in (1, 2, 4, 8):
    mesh = sharding.make_mesh((("data", 1), ("fsdp", -1)), cpus[:n])
    out[n] = train.state_bytes_per_device(config, name, mesh)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/shapes.py")
  ap.add_argument("--stage", default="teacher")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype of the stage's model and of the reference matmul (bf16 on a GPU)")
  ap.add_argument("--batch", type=int, nargs="+", help="global batch(es) instead of the config's")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field (python literal), e.g. distill.recipe=student_only")
  ap.add_argument("--matmul-n", type=int, default=2048, help="reference matmul size (8192 on a GPU)")
  ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
  ap.add_argument("--no-mesh-memory", action="store_true",
                  help="skip the per-mesh state memory table (CPU compiles; already in the CPU table)")
  ap.add_argument("--section", default="train_step",
                  help="BENCHMARKS.md section to replace (train_step_gpu for a GPU's table)")
  args = ap.parse_args()

  from benchmarks.recipes import apply_overrides

  config = load_config(args.config)
  apply_overrides(config, args.set, config)
  config[args.stage].model.dtype = args.dtype
  peak = matmul_flops_per_sec(args.matmul_n, dtype=args.dtype)
  rows = []
  for b in args.batch or [config[args.stage].batch_size]:
    config[args.stage].batch_size = b
    rows.append(step_throughput(config, args.stage, args.steps))
    print(rows[-1], flush=True)
  mem = {} if args.no_mesh_memory else {
      args.config: memory_by_mesh(config, args.stage),
      "configs/coco.py": memory_by_mesh(load_config("configs/coco.py"), "teacher")}

  lines = [
      f"Measured by `python -m benchmarks.train_step --config={args.config} --stage={args.stage} "
      f"--steps={args.steps} --dtype={args.dtype} --matmul-n={args.matmul_n}"
      f"{' --batch ' + ' '.join(map(str, args.batch)) if args.batch else ''}"
      f"{''.join(' --set ' + x for x in args.set)}{' --no-mesh-memory' if args.no_mesh_memory else ''}"
      f"{f' --section={args.section}' if args.section != 'train_step' else ''}"
      f" --write` on "
      f"{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores), "
      f"jax {jax.__version__}; throughput on 1 of {jax.device_count()} devices; the MFU ratio "
      f"divides by a {args.matmul_n}^3 {args.dtype} matmul timed in the same run.",
      "",
      "| config | stage | batch | step (ms) | examples/s | GFLOP/step (matmuls) "
      "| GFLOP/step (XLA cost analysis) | achieved GFLOP/s | matmul GFLOP/s | MFU ratio "
      "| step memory |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
      *(f"| {args.config} | {args.stage} | {t['batch']} | out of memory | | | | | | | |"
        if t.get("oom") else
        f"| {args.config} | {args.stage} | {t['batch']} | {1e3 * t['step_s']:.1f} "
        f"| {t['examples_per_s']:,.0f} | {t['flops_per_step'] / 1e9:.2f} "
        f"| {t['xla_flops_per_step'] / 1e9:.2f} "
        f"| {t['achieved_flops'] / 1e9:.1f} | {peak / 1e9:.1f} "
        f"| {t['achieved_flops'] / peak:.3f} | {t['step_bytes'] / 2**30:.2f} GiB |" for t in rows),
  ]
  if mem:
    lines += [
        "",
        "Per-device params + optimizer bytes (`compiled.memory_analysis()` of the sharded init, "
        "FSDP over all devices):",
        "",
        f"| config ({args.stage}; coco.py: teacher) | 1 device | 2 devices | 4 devices | 8 devices "
        "| 8 / 1 |",
        "|---|---|---|---|---|---|",
    ]
  for cfg_name, m in mem.items():
    lines.append(f"| {cfg_name} | " + " | ".join(f"{m[n] / 2**20:,.1f} MiB" for n in (1, 2, 4, 8))
                 + f" | {m[8] / m[1]:.3f} |")
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("BENCHMARKS.md", args.section, "Train step", lines)

if __name__ == "__main__":
  main()
