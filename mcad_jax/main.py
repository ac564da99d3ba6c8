"""Entry point: `python -m mcad_jax.main --config=configs/shapes.py[:VARIANT] --workdir=W`.

Wires things together and nothing else: flags -> config check -> distributed
init -> mesh -> `train.run_stages`. Exit codes: 0 on success, 2 on a bad config
or bad arguments (before any compute), 1 on any other failure.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFDS imports TF; keep its C++ logs quiet.

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")

EXIT_BAD_CONFIG = 2


def _fail_config(msg: str) -> None:
  print(f"mcad_jax: {msg}", file=sys.stderr)
  sys.exit(EXIT_BAD_CONFIG)


def parse_flags(argv):
  """absl flag parsing, but a bad flag or config override exits 2 with the reason."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail_config(f"bad argument: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # From config overrides.
    _fail_config(f"bad config override: {e}")


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment says there are several processes.

  Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any
  platform), or a TPU pod / SLURM environment that JAX detects on its own
  (set MCAD_DISTRIBUTED=1 there).
  """
  import jax

  n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if n > 1:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], n,
                               int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("MCAD_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def setup_logging() -> None:
  """Our messages at INFO on stderr; the libraries' (orbax, TFDS, absl) at WARNING."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("mcad_jax")
  log.setLevel(logging.INFO)
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mcad_jax] %(message)s"))
    log.addHandler(handler)
    log.propagate = False


def main(argv) -> None:
  if len(argv) > 1:
    _fail_config(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    _fail_config("--config is required, e.g. --config=configs/shapes.py:smoke")
  if not _WORKDIR.value:
    _fail_config("--workdir is required")
  from mcad_jax import config_lib

  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail_config(str(e))

  setup_logging()
  maybe_initialize_distributed()
  import jax

  from mcad_jax import sharding, train

  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    _fail_config(f"config error at 'mesh': {e}")
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  from mcad_jax import metrics, preemption

  try:
    results = train.run_stages(config, workdir, mesh)
  except metrics.NonFiniteLossError as e:
    print(f"mcad_jax: {e}", file=sys.stderr)
    sys.exit(1)
  except preemption.Preempted as e:
    print(f"mcad_jax: {e}", file=sys.stderr)
    sys.exit(143)
  except train.StageFailed as e:
    print(f"mcad_jax: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(train.format_table(results))
    print(f"results: {os.path.join(workdir, 'results.json')}")


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
