"""A 2-process CPU run (jax.distributed, 2 fake devices each, via launch/local.sh) equals 1 process."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from mcad_jax import workdir_lock

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
  p2 = subprocess.Popen(["bash", "launch/local.sh", "2", "2", "--", *ARGS, f"--workdir={two}"],
                        cwd=ROOT, env=_env(1, PYTHON=sys.executable, PORT=_free_port()),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The two processes of the run share the workdir (each holds its own lock file), while any
  # other run is refused: here, as process 0 of a second run would be.
  locks = [two / f".lock-{i}" for i in range(2)]
  deadline = time.time() + 300
  while time.time() < deadline and p2.poll() is None and not all(
      f.exists() and "pid=" in f.read_text() for f in locks):
    time.sleep(0.05)
  held = p2.poll() is None
  if held:
    with pytest.raises(workdir_lock.WorkdirBusy, match="in use by another run"):
      workdir_lock.WorkdirLock(str(two), 0).acquire()
  _, err2 = p2.communicate(timeout=600)
  logs = [(two / f"proc{i}.log").read_text() for i in range(2) if (two / f"proc{i}.log").exists()]
  assert p2.returncode == 0, err2 + "".join(x[-1500:] for x in logs)
  assert held, "the run ended before both of its processes held their locks"

  l1, l2 = _losses(one), _losses(two)
  assert len(l1) == len(l2) == 6
  for a, b in zip(l1, l2, strict=True):
    assert abs(a - b) <= 1e-5 * abs(a), (l1, l2)
  r1 = json.loads((one / "results.json").read_text())["retrieval"]["teacher"]
  r2 = json.loads((two / "results.json").read_text())["retrieval"]["teacher"]
  assert r1 == pytest.approx(r2, abs=0.5)
  # Only process 0 printed the table.
  assert sum("rsum" in log for log in logs) == 1
