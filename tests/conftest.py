"""Test setup: 8 fake CPU devices, a persistent compile cache, a shared TFDS dir.

The environment is set before JAX is imported so the sharded code paths run
for real, and subprocesses started by tests inherit it.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".pytest_cache"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax_cache"))
os.environ.setdefault("TFDS_DATA_DIR", str(CACHE / "tfds"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_PLATFORMS"] = "cpu"

import pytest  # noqa: E402

sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running; only with --runslow")
  config.addinivalue_line("markers", "multiprocess: starts several JAX processes")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data():
  """shapes/tiny prepared once into the shared TFDS dir; returns a data ConfigDict."""
  from configs import shapes
  from mcad_jax.data import pipeline

  cfg = shapes.get_config("smoke").data
  pipeline.ensure_prepared(cfg)
  return cfg


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tiny_data):
  """(workdir, CompletedProcess) of the teacher stage run once without faults (test_main.STEPS).

  The reference that killed, preempted and faulted runs must match after their rerun; shared by
  test_main.py and test_faults.py.
  """
  from tests.test_main import STEPS, run_main

  del tiny_data
  w = tmp_path_factory.mktemp("full")
  r = run_main(w, *STEPS)
  assert r.returncode == 0, r.stderr[-3000:]
  return w, r
