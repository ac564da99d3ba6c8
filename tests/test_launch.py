"""launch/tpu.sh against a stub gcloud that records its arguments (no GCP here)."""

import json
import os
import pathlib
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def gcloud(tmp_path):
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir()
  stub.write_text(STUB)
  stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "calls.jsonl"

  def run(cmd, **env):
    e = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "GCLOUD_LOG": str(log),
         **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh"), cmd], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=60)
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return r, calls

  return run


def test_create_pod_slice_on_spot(gcloud):
  r, calls = gcloud("create", TPU_NAME="t1", ZONE="us-east5-a", ACCEL="v5litepod-16", SPOT=1,
                    PROJECT="p1")
  assert r.returncode == 0, r.stderr
  (c,) = calls
  assert c[:4] == ["compute", "tpus", "tpu-vm", "create"] and c[4] == "t1"
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
          "--zone=us-east5-a", "--project=p1"} <= set(c)


def test_install_and_run_go_to_every_worker(gcloud):
  r, calls = gcloud("install", REPO="https://example.com/mcad_jax.git", BUCKET="my-bucket")
  assert r.returncode == 0, r.stderr
  (c,) = calls
  assert "ssh" in c and "--worker=all" in c
  cmd = next(x for x in c if x.startswith("--command="))
  assert "uv venv -q -p 3.11" in cmd and "'.[tfds,tpu]'" in cmd and "gcsfuse" in cmd
  assert "git clone -q -b main https://example.com/mcad_jax.git" in cmd

  r, calls = gcloud("run", CONFIG="configs/coco.py", WORKDIR="/mnt/gcs/runs/x",
                    EXTRA="--config.teacher.steps=10")
  assert r.returncode == 0, r.stderr
  (c,) = calls
  assert "--worker=all" in c
  cmd = next(x for x in c if x.startswith("--command="))
  assert "MCAD_DISTRIBUTED=1" in cmd
  assert "-m mcad_jax.main --config=configs/coco.py --workdir=/mnt/gcs/runs/x" in cmd
  assert "--config.teacher.steps=10" in cmd


def test_logs_copy_delete_and_errors(gcloud):
  r, calls = gcloud("logs")
  assert r.returncode == 0 and "--worker=0" in calls[0] and "ssh" in calls[0]
  r, calls = gcloud("copy", TPU_NAME="t2", WORKDIR="/mnt/gcs/runs/t2")
  assert r.returncode == 0, r.stderr
  assert "scp" in calls[0] and "t2:/mnt/gcs/runs/t2/results.json" in calls[0]
  r, calls = gcloud("delete", TPU_NAME="t2")
  assert calls[0][3:5] == ["delete", "t2"] and "--quiet" in calls[0]
  r, calls = gcloud("install")
  assert r.returncode == 2 and "REPO" in r.stderr and not calls
  r, calls = gcloud("explode")
  assert r.returncode == 2 and "unknown command" in r.stderr and not calls
