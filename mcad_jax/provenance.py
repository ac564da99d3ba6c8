"""Config provenance: decides, before any compute, what a rerun may keep of a workdir.

Each stage records the config it trains with in `W/<stage>/config.json`: its own
section, the data section, the seed, and the fingerprints of the stages it reads
(`reads.<stage>`). A rerun compares the current config with those records:

- no difference outside `PASS` -> the stage is kept (skipped if finished,
  resumed if cut off);
- only `<stage>.steps` raised -> the stage continues from its last checkpoint
  and is evaluated again (optax's cosine decay has `decay_steps = steps`, so the
  lr of the steps after the old end follows the new schedule);
- a stage it reads trains again (raised steps or an accepted change) -> the
  stage is redone from scratch;
- any other difference -> `ConfigChanged` (exit 2) naming the stage and the keys,
  unless `accept` (`--accept_config_change`), which redoes the stage.

Keys not recorded at all (log_every, ckpt_every, keep_ckpts, name,
eval_batch_size, mesh, sharding) never stop a rerun: they change how a stage
runs, not what it computes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os

from mcad_jax import fileio

CONFIG_FILE = "config.json"

# Recorded keys (fnmatch patterns) whose change leaves what a stage computed as it was: speed,
# the evaluation's size, or where the same data lives (the dataset is named by data.tfds_name;
# the teacher cache is keyed by the teacher's params). Keep this short: anything here is
# trusted not to change a finished stage.
PASS = ("data.eval_limit", "data.num_threads", "data.prefetch", "data.generate_workers",
        "data.data_dir", "data.manual_dir", "*.cache_dir")

KEEP, NEW, CONTINUE, REDO = "keep", "new", "continue", "redo"


class ConfigChanged(ValueError):
  """The config differs from the one a finished or part-trained stage was trained with."""


def _passes(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in PASS)


def _flat(prefix: str, value) -> dict:
  if hasattr(value, "items"):
    out = {}
    for k, v in value.items():
      out.update(_flat(f"{prefix}.{k}", v))
    return out
  if isinstance(value, tuple):
    value = list(value)
  return {prefix: json.loads(json.dumps(value, default=str))}


def reads(config, name: str) -> list[str]:
  """The stages of `config` whose outputs stage `name` reads."""
  s = config[name]
  refs = []
  if s.get("fusion") is not None:
    refs.append(s.fusion.get("towers_from", ""))
  if s.get("teachers") is not None:
    refs += [s.teachers.get("dual", ""), s.teachers.get("fusion", "")]
  if s.get("kind") == "export":
    refs.append(s.get("source", ""))
  return [r for r in refs if r and r in config and hasattr(config[r], "get") and config[r].get("kind")]


def record(config, name: str) -> dict:
  """What stage `name` computes from: flat dotted keys -> values."""
  rec = {**_flat(name, config[name]), **_flat("data", config.data), "seed": config.seed}
  for dep in reads(config, name):
    rec[f"reads.{dep}"] = fingerprint(config, dep)
  return rec


def fingerprint(config, name: str) -> str:
  """Hash of stage `name`'s record without the `PASS` keys (its readers record it)."""
  rec = {k: v for k, v in record(config, name).items() if not _passes(k)}
  return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def read_record(stage_dir: str) -> dict | None:
  return fileio.read_json(os.path.join(stage_dir, CONFIG_FILE))


def _state(stage_dir: str) -> str | None:
  if os.path.exists(os.path.join(stage_dir, "done.json")):
    return "finished"
  ck = os.path.join(stage_dir, "checkpoints")
  if os.path.isdir(ck) and any(p.isdigit() for p in os.listdir(ck)):
    return "part-trained"
  return None


def plan(config, workdir: str, accept: bool = False) -> dict[str, str]:
  """{stage: KEEP | NEW | CONTINUE | REDO} for every configured stage.

  Raises:
    ConfigChanged: a finished or part-trained stage's recorded config differs in a key that
      changes what it computed, and `accept` is False.
  """
  actions = {}
  for name in config.stages:
    stage_dir = os.path.join(workdir, name)
    state, old = _state(stage_dir), read_record(stage_dir)
    if state is None or old is None:
      actions[name] = NEW  # Nothing made yet, or made before stages recorded their config.
      continue
    new = record(config, name)
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not _passes(k) and not k.startswith("reads.") and old.get(k) != new.get(k)}
    steps = diff.get(f"{name}.steps")
    raised = (steps is not None and isinstance(steps[0], int) and isinstance(steps[1], int)
              and steps[1] > steps[0] and config[name].get("kind") != "export")
    if raised:
      del diff[f"{name}.steps"]
    if diff and not accept:
      keys = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items())
      raise ConfigChanged(
          f"the config of {state} stage {name!r} differs from the one it was trained with "
          f"({os.path.join(stage_dir, CONFIG_FILE)}): {keys}. Use a new --workdir, or "
          f"--accept_config_change to retrain {name!r} and the stages that read it")
    reads_changed = any(old.get(k) != v for k, v in new.items() if k.startswith("reads."))
    actions[name] = REDO if diff or reads_changed else CONTINUE if raised else KEEP
  return actions
