"""A 2-process CPU run (jax.distributed, 2 fake devices each, via launch/local.sh) equals 1 process."""

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

  # Through the local launcher, as a user would start it.
  two = tmp_path / "two"
  r2 = subprocess.run(["bash", "launch/local.sh", "2", "2", "--", *ARGS, f"--workdir={two}"],
                      cwd=ROOT, env=_env(1, PYTHON=sys.executable, PORT=_free_port()),
                      capture_output=True, text=True, timeout=600)
  logs = [(two / f"proc{i}.log").read_text() for i in range(2) if (two / f"proc{i}.log").exists()]
  assert r2.returncode == 0, r2.stderr + "".join(x[-1500:] for x in logs)

  l1, l2 = _losses(one), _losses(two)
  assert len(l1) == len(l2) == 6
  for a, b in zip(l1, l2, strict=True):
    assert abs(a - b) <= 1e-5 * abs(a), (l1, l2)
  r1 = json.loads((one / "results.json").read_text())["retrieval"]["teacher"]
  r2 = json.loads((two / "results.json").read_text())["retrieval"]["teacher"]
  assert r1 == pytest.approx(r2, abs=0.5)
  # Only process 0 printed the table.
  assert sum("rsum" in log for log in logs) == 1
