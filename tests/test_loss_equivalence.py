"""Every recipe's loss, bit for bit, on one fixed batch: a guard for restructuring the code.

The reference values in `golden_losses.json` were written by the code before a restructuring
(see its `commit`); the same params, batch and teachers must give the same float32 bits after it.
A change that is meant to alter a loss rewrites the file, in the commit that says why:

  python -m tests.test_loss_equivalence --write
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_losses.json")
# (name, stage, distill overrides): every recipe, and MCAD's modes and switches.
CASES = (
    ("teacher", "teacher", {}),
    ("teacher+twins", "teacher", {"hard_columns": True}),
    ("student_only", "distill", {"recipe": "student_only", "hard_columns": False}),
    ("student_only+twins", "distill", {"recipe": "student_only"}),
    ("clip_kd", "distill", {"recipe": "clip_kd"}),
    ("tinyclip", "distill", {"recipe": "tinyclip"}),
    ("conaclip", "distill", {"recipe": "conaclip"}),
    ("mcad", "distill", {}),
    ("mcad:alpha=0", "distill", {"mcad.alpha": 0.0}),
    ("mcad:no_hard_itm", "distill", {"mcad.hard_itm_weight": 0.0}),
    ("mcad:fixed", "distill", {"mcad.proj": "fixed"}),
    ("mcad:concat", "distill", {"mcad.combine": "concat"}),
    ("mcad:gate", "distill", {"mcad.combine": "gate"}),
    ("mcad:all_pairs", "distill", {"mcad.mode": "all_pairs"}),
)


def _set(section, key: str, value) -> bool:
  """Sets a dotted key; False if this version of the config has no such key."""
  *parents, leaf = key.split(".")
  node = section
  for k in parents:
    node = node[k]
  if leaf not in node:
    return False
  node[leaf] = value
  return True


def _teachers(config, workdir: str, mesh) -> None:
  """Random-init teacher checkpoints (fixed keys), as if those stages had run."""
  import jax
  import jax.numpy as jnp

  from mcad_jax import checkpoint, stages

  for name in ("teacher", "fusion_teacher"):
    if os.path.isdir(os.path.join(workdir, name)):
      continue
    params = jax.jit(stages.build(config, name, workdir, mesh).init)(jax.random.key(len(name)))
    ck = checkpoint.Checkpointer(os.path.join(workdir, name, "checkpoints"), async_save=False)
    ck.save(1, {"params": params, "step": jnp.int32(1)}, {"iter": {}})
    ck.close()


def losses_of(workdir: str) -> dict[str, dict[str, str]]:
  """{case: {term: float32 hex}} for every case this version of the code has switches for."""
  import jax

  from configs import shapes
  from mcad_jax import sharding, stages
  from mcad_jax.data import pipeline

  out = {}
  base = shapes.get_config("smoke")
  mesh = sharding.make_mesh(base.mesh)
  _teachers(base, workdir, mesh)
  for name, stage_name, over in CASES:
    config = shapes.get_config("smoke")
    if not all(_set(config[stage_name], k, v) for k, v in over.items()):
      continue
    stage = stages.build(config, stage_name, workdir, mesh)
    params = jax.jit(stage.init)(jax.random.key(0))
    it = pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config),
                                 config[stage_name].batch_size, 0, extra=stage.extra_tokenizers)
    batch = next(it)
    batch = stage.host_fn(batch) if stage.host_fn else batch
    batch = {k: batch[k] for k in stage.batch_keys}
    loss, terms = jax.jit(stage.loss_fn)(params, batch, jax.random.key(1), stage.frozen)
    vals = {"loss": loss, **terms}
    out[name] = {k: np.float32(jax.device_get(v)).tobytes().hex() for k, v in sorted(vals.items())}
  return out


def cpu() -> str:
  """The CPU model: XLA's CPU kernels, and so the last bits of a loss, differ between models."""
  with open("/proc/cpuinfo") as f:
    return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


def test_every_recipe_loss_is_bit_identical_to_the_reference(tiny_data, tmp_path):
  """Bit for bit on the CPU model that wrote the reference; elsewhere to 1e-4 (XLA's CPU code
  differs by model, so bits cannot be asked of another one)."""
  del tiny_data
  with open(GOLDEN) as f:
    golden = json.load(f)
  want, same_cpu = golden["losses"], golden.get("cpu") == cpu()
  got = losses_of(str(tmp_path))
  assert set(want) <= set(got), f"cases missing: {sorted(set(want) - set(got))}"
  val = lambda h: np.frombuffer(bytes.fromhex(h), np.float32)[0]
  diff = {f"{case}/{k}": (val(v), val(got[case].get(k, "00000000")))
          for case, terms in want.items() for k, v in terms.items()
          if (got[case].get(k) != v if same_cpu
              else not np.isclose(val(v), val(got[case].get(k, "00000000")), rtol=1e-4, atol=1e-6))}
  assert not diff, f"losses changed (reference, now): {diff}"


def main() -> None:
  import tempfile

  if "--write" not in sys.argv:
    sys.exit("usage: python -m tests.test_loss_equivalence --write")
  from tests import conftest  # noqa: F401  (the 8 fake devices and the tiny dataset's data dir)

  with tempfile.TemporaryDirectory() as d:
    losses = losses_of(d)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  with open(GOLDEN, "w") as f:
    json.dump({"commit": commit, "cpu": cpu(), "losses": losses}, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {GOLDEN}: {len(losses)} cases at {commit}")


if __name__ == "__main__":
  main()
