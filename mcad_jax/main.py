"""Entry point: `python -m mcad_jax.main --config=configs/shapes.py[:VARIANT] --workdir=W`.

Wires things together and nothing else: flags -> config check -> workdir and
its lock -> distributed init -> mesh -> device checks -> `run.run_stages`.
Exit codes: 0 on success, 2 on a bad config or bad arguments (before any
compute, also for a workdir another run holds or a config that differs from
the one its stages trained with, `provenance.plan`), 143 when preempted, 1 on any
other failure. An anticipated failure prints one line; its traceback goes to
the log file `W/mcad_jax.log` (and to stderr with `--verbosity=1`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFDS imports TF; keep its C++ logs quiet.

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_ACCEPT = flags.DEFINE_bool("accept_config_change", False,
                            "Retrain the stages whose recorded config differs from --config "
                            "(and the stages that read them) instead of exiting 2.")

EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_PREEMPTED = 1, 2, 143

log = logging.getLogger("mcad_jax")


def _fail_config(msg: str) -> None:
  print(f"mcad_jax: {msg}", file=sys.stderr)
  sys.exit(EXIT_BAD_CONFIG)


def parse_flags(argv):
  """absl flag parsing, but a bad flag or config override exits 2 with the reason."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
    if "Traceback (most recent call last)" in msg:
      # ml_collections puts the config file's traceback (e.g. an unknown variant's ValueError)
      # in the message: keep the flag and the error's own line.
      flag = re.match(r"flag (--\S+?): ", msg)
      msg = re.sub(r"^\w+: ", "", msg.strip().splitlines()[-1].strip())
      msg = f"{flag.group(1)}: {msg}" if flag else msg
    _fail_config(f"bad argument {msg}" if msg.startswith("--") else f"bad argument: {msg}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # From config overrides.
    _fail_config(f"bad config override: {e}")


def _verbose() -> bool:
  """`--verbosity=1` (absl's flag) also prints tracebacks and the libraries' logs."""
  return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1


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


class _Brief(logging.Formatter):
  """The message without the traceback (which the log file keeps)."""

  def format(self, record):
    saved = record.exc_info, record.exc_text
    record.exc_info = record.exc_text = None
    try:
      return super().format(record)
    finally:
      record.exc_info, record.exc_text = saved


def setup_logging(log_file: str | None = None) -> None:
  """Our messages at INFO on stderr; the libraries' (orbax, TFDS, absl) at ERROR there, and
  their warnings ("OpenCV is not installed", folder notices) only in the log file (all of it on
  stderr with --verbosity=1).

  With `log_file`, everything (ours and the libraries', with tracebacks) also
  goes there. Library records that carry a traceback (orbax logs a failed
  background save several times over) stay out of stderr unless verbose: the
  one line that `main` prints says what failed.
  """
  from absl import logging as absl_logging

  verbose = _verbose()
  if not log.handlers:
    if not verbose:
      absl_logging.set_verbosity(absl_logging.WARNING)
      for h in logging.root.handlers:
        h.addFilter(lambda r: not r.exc_info)
        h.setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mcad_jax] %(message)s") if verbose
                         else _Brief("[mcad_jax] %(message)s"))
    handler.addFilter(lambda r: r.name != _EXIT_LOG.name)  # main prints that line itself.
    log.addHandler(handler)
  if log_file:
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(fh)
    logging.root.addHandler(fh)


_EXIT_LOG = logging.getLogger("mcad_jax.exit")


def _stop(e: BaseException, code: int) -> None:
  """One line on stderr; the traceback in the log file (and on stderr if verbose)."""
  _EXIT_LOG.error("exit %d", code, exc_info=e)
  if _verbose():
    traceback.print_exception(e)
  msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
  print(f"mcad_jax: {msg}", file=sys.stderr)
  sys.exit(code)


def main(argv) -> None:
  if len(argv) > 1:
    _fail_config(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("stages")  # ml_collections loads the file lazily, on first access.
  except OSError as e:
    _fail_config(f"bad argument --config: {str(e).strip().splitlines()[-1].strip()}")
  if config is None:
    _fail_config("--config is required, e.g. --config=configs/shapes.py:smoke")
  if not _WORKDIR.value:
    _fail_config("--workdir is required")
  from mcad_jax import config_lib, provenance

  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail_config(str(e))
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    _fail_config(f"bad argument --workdir: cannot create {workdir}: {e.strerror}")

  setup_logging()
  maybe_initialize_distributed()
  import jax

  from mcad_jax import checkpoint, convert, fileio, metrics, preemption, run, sharding, workdir_lock
  from mcad_jax.data import pipeline

  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    _fail_config(f"config error at 'mesh': {e}")
  try:
    config_lib.validate_for_mesh(config, mesh)
    lock = workdir_lock.lock_workdir(workdir)  # noqa: F841 - held until the process ends.
    actions = provenance.plan(config, workdir, accept=_ACCEPT.value)
  except (config_lib.ConfigError, workdir_lock.WorkdirBusy, provenance.ConfigChanged) as e:
    _fail_config(str(e))
  p = jax.process_index()
  setup_logging(os.path.join(workdir, "mcad_jax.log" if p == 0 else f"mcad_jax.{p}.log"))
  why = pipeline.unpreparable(config.data)
  if why:
    _fail_config(why)
  try:
    if p == 0:  # Only a config that passed the provenance check; each run's kept by its time.
      text = config.to_json_best_effort(indent=2)
      os.makedirs(os.path.join(workdir, "configs"), exist_ok=True)
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      fileio.atomic_write(os.path.join(workdir, "configs", f"{stamp}.json"), text)
      fileio.atomic_write(os.path.join(workdir, "config.json"), text)
    results = run.run_stages(config, workdir, mesh, actions)
  except preemption.Preempted as e:
    _stop(e, EXIT_PREEMPTED)
  except (metrics.NonFiniteLossError, run.StageFailed, checkpoint.CheckpointError,
          checkpoint.CheckpointSaveError, convert.WeightsError, pipeline.DataFault, OSError) as e:
    _stop(e, EXIT_FAILED)
  if p == 0:
    print(run.format_table(results))
    print(f"results: {os.path.join(workdir, 'results.json')}")


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
