"""Teacher weights shipped inside the package: where they are, how they were made, checks.

`configs/shapes.py` (the demo) starts its teacher and fusion-teacher stages from
these, as real users start from pretrained CLIP and ALBEF; `shapes.py:teachers`
retrains them. Each set is a directory `mcad_jax/weights/<name>/` holding one
params-only orbax checkpoint per stage (`<stage>/<step>/state`, what
`<stage>.weights` reads) and `MANIFEST.json`: the command that produced them, the
SHA-256 of every file, and each stage's retrieval numbers on a small eval that
`tests/test_shipped.py` reproduces.

Write a set from a finished workdir:

  python -m mcad_jax.shipped --workdir workdirs/teachers --name shapes \\
      --command "python -m mcad_jax.main --config=configs/shapes.py:teachers --workdir=workdirs/teachers"
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent / "weights"
MANIFEST = "MANIFEST.json"


def path(name: str, stage: str) -> str:
  """The checkpoint directory of `stage` in shipped set `name` (for `<stage>.weights`)."""
  return str(ROOT / name / stage)


def _files(directory: pathlib.Path) -> dict[str, str]:
  out = {}
  for p in sorted(directory.rglob("*")):
    if p.is_file() and p.name != MANIFEST:
      out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def verify(name: str) -> dict:
  """Checks every file of set `name` against its manifest; returns the manifest.

  Raises ValueError naming the first missing, extra or changed file.
  """
  directory = ROOT / name
  manifest = json.loads((directory / MANIFEST).read_text())
  have, want = _files(directory), manifest["sha256"]
  for f in sorted(set(have) | set(want)):
    if have.get(f) != want.get(f):
      what = "missing" if f not in have else "not in the manifest" if f not in want else "changed"
      raise ValueError(f"shipped weights {name}: {f} is {what}; re-ship with python -m mcad_jax.shipped")
  return manifest


def write(config, workdir: str, name: str, stages: tuple[str, ...], command: str,
          eval_images: int) -> dict:
  """Copies the params of each finished stage of `workdir` (trained with `config`) into set
  `name`, with its manifest."""
  import shutil

  import jax
  import orbax.checkpoint as ocp

  from mcad_jax import fileio, sharding, stages as stage_lib, train

  mesh = sharding.make_mesh(config.mesh)
  out = ROOT / name
  if out.exists():
    shutil.rmtree(out)
  small_eval = {}
  for stage in stages:
    src = os.path.join(workdir, stage, "checkpoints")
    st = stage_lib.build(config, stage, workdir, mesh)
    _, _, abstract = train.abstract_state(st, config[stage], config, mesh)
    from mcad_jax import checkpoint

    params = checkpoint.load_params(src, abstract["params"])
    step = max(int(p) for p in os.listdir(src) if p.isdigit())
    with ocp.CheckpointManager(str(out / stage), options=ocp.CheckpointManagerOptions(create=True)) as m:
      m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
      m.wait_until_finished()
    small_eval[stage] = small_eval_metrics(config, stage, jax.device_get(params), eval_images)
  manifest = {"name": name, "command": command, "stages": list(stages),
              "small_eval": {"images": eval_images, "metrics": small_eval}, "sha256": _files(out)}
  fileio.atomic_write(str(out / MANIFEST), json.dumps(manifest, indent=2) + "\n")
  return manifest


def small_eval_metrics(config, stage: str, params, n: int) -> dict:
  """Retrieval and hard-negative metrics of `stage` on the first `n` test scenes, built
  straight from the generator (no TFDS), so a test can reproduce them anywhere."""
  import numpy as np

  from mcad_jax import evaluate, sharding
  from mcad_jax.data import scenes
  from mcad_jax.data.pipeline import EvalSet
  from mcad_jax.stages import common, fusion

  spec = scenes.default_spec()
  tok = common.tokenizer(config, config[stage].model)
  exs = [scenes.example(spec, 0, "test", i) for i in range(n)]
  hard = {k: tok.encode_batch([e[f"hn_{k}"] for e in exs]) for k in ("true", "relation", "attribute")}
  hard.update({f"{k}_valid": np.array([bool(e[f"hn_{k}"]) for e in exs])
               for k in ("true", "relation", "attribute")})
  test = EvalSet(np.stack([e["image"] for e in exs]),
                 tok.encode_batch([c for e in exs for c in e["captions"]]), hard)
  mesh = sharding.make_mesh(config.mesh)
  scfg = config[stage]
  if scfg.kind == "fusion":
    model = fusion.fusion_model(config, scfg)
    return fusion.fusion_metrics(config, scfg, model, params, mesh, test)
  model = common.dual_model(config, scfg.model)
  enc_img, enc_txt = common.encoders(model)
  return evaluate.evaluate_dual(enc_img, enc_txt, params, test, mesh, config.eval_batch_size)[0]


def main(argv) -> int:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default="configs/shapes.py:teachers",
                 help="the config FILE[:VARIANT] that trained the workdir")
  p.add_argument("--name", default="shapes")
  p.add_argument("--stages", nargs="+", default=["teacher", "fusion_teacher"])
  p.add_argument("--command", required=True, help="the command that trained the workdir")
  p.add_argument("--eval-images", type=int, default=500)
  a = p.parse_args(argv)
  from mcad_jax import config_lib

  m = write(config_lib.load_file(a.config), a.workdir, a.name, tuple(a.stages), a.command,
            a.eval_images)
  print(json.dumps(m["small_eval"], indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
