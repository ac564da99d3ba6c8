"""A 2-process CPU run (jax.distributed, 2 fake devices each) equals a 1-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/shapes.py:smoke", "--config.stages=('teacher',)",
        "--config.teacher.steps=6", "--config.log_every=1",
        "--config.teacher.optim.warmup_steps=2",
        "--config.ckpt_every=3", "--config.data.eval_limit=64"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _losses(workdir):
  with open(workdir / "teacher" / "metrics.jsonl") as f:
    return [r["training_loss"] for r in map(json.loads, f)]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, tiny_data):
  del tiny_data
  cmd = [sys.executable, "-m", "mcad_jax.main", *ARGS]
  one = tmp_path / "one"
  r = subprocess.run([*cmd, f"--workdir={one}"], cwd=ROOT, env=_env(4), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(
      [*cmd, f"--workdir={two}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_env(2, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"))
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]

  l1, l2 = _losses(one), _losses(two)
  assert len(l1) == len(l2) == 6
  for a, b in zip(l1, l2, strict=True):
    assert abs(a - b) <= 1e-5 * abs(a), (l1, l2)
  r1 = json.loads((one / "results.json").read_text())["retrieval"]["teacher"]
  r2 = json.loads((two / "results.json").read_text())["retrieval"]["teacher"]
  assert r1 == pytest.approx(r2, abs=0.5)
  # Only process 0 printed the table.
  assert sum("rsum" in out for out, _ in outs) == 1
