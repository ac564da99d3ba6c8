"""The main job end to end, as a user runs it: exit codes, outputs, kill and resume, NaN stop."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "configs/shapes.py:smoke"


def main_cmd(workdir, *overrides, config=SMOKE):
  return [sys.executable, "-m", "mcad_jax.main", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def run_main(workdir, *overrides, config=SMOKE, timeout=600):
  return subprocess.run(main_cmd(workdir, *overrides, config=config), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def final_params(workdir, stage="teacher"):
  ckdir = pathlib.Path(workdir) / stage / "checkpoints"
  step = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(ckdir) as mngr:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return step, jax.tree.map(np.asarray, state["params"])


def losses_by_step(workdir, stage="teacher"):
  with open(pathlib.Path(workdir) / stage / "metrics.jsonl") as f:
    return {r["step"]: r["training_loss"] for r in map(json.loads, f)}


@pytest.mark.parametrize("override,key", [
    ("--config.teacher.not_a_key=1", "not_a_key"),
    ("--config.teacher.loss=hinge", "teacher.loss"),
    ("--config.teacher.batch_size=-4", "teacher.batch_size"),
    ("--config.teacher.model.image=XXL/8", "teacher.model.image"),
    ("--config.data.tfds_name=imagenet", "data.tfds_name"),
])
def test_bad_config_exits_2_and_names_key(tmp_path, override, key):
  t = time.time()
  r = run_main(tmp_path / "w", override)
  assert r.returncode == 2, r.stderr[-2000:]
  assert key in r.stderr
  assert not (tmp_path / "w" / "teacher").exists()  # Nothing ran.
  assert time.time() - t < 120


def test_bad_variant_exits_2(tmp_path):
  r = run_main(tmp_path / "w", config="configs/shapes.py:nope")
  assert r.returncode == 2 and "nope" in r.stderr


# The loop's mechanics are tested on the teacher stage alone, to keep the suite fast; the
# `uninterrupted` run of these steps (conftest.py) is the reference every resumed run must match.
STEPS = ["--config.stages=('teacher',)", "--config.teacher.steps=120", "--config.ckpt_every=20",
         "--config.log_every=1"]


def test_results_and_metrics_contract(uninterrupted):
  w, r = uninterrupted
  res = json.loads((w / "results.json").read_text())
  assert res["config"] == "shapes:smoke"
  assert res["stages"]["teacher"]["steps"] == 120 and res["stages"]["teacher"]["seconds"] > 0
  row = res["retrieval"]["teacher"]
  assert set(row) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
  assert all(0 <= v <= 100 for k, v in row.items() if k != "rsum")
  # Chance RSUM on 200 images x 1000 captions is ~ 16; a trained teacher is far above it.
  assert row["rsum"] > 100
  assert "teacher" in r.stdout and "rsum" in r.stdout  # The printed table.
  recs = [json.loads(x) for x in (w / "teacher" / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in recs] == list(range(1, 121))
  for k in ("step", "training_loss", "lr", "examples_per_sec", "loss/infonce", "l2_grads"):
    assert k in recs[-1]
  assert recs[-1]["training_loss"] < recs[0]["training_loss"]
  assert "ETA" in r.stderr and "ex/s" in r.stderr


def test_smoke_pipeline_has_every_stage_and_row(tmp_path, tiny_data):
  """The smoke variant as a user runs it: teacher -> fusion teacher -> MCAD student -> export."""
  del tiny_data
  w = tmp_path / "smoke"
  r = run_main(w)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((w / "results.json").read_text())
  assert list(res["stages"]) == ["teacher", "fusion_teacher", "distill", "export"]
  assert set(res["retrieval"]) == {"teacher", "fusion_teacher", "student", "student_fp32",
                                   "student_int8", "student_npu"}
  assert set(res["hard_negatives"]) == {"teacher", "fusion_teacher", "student"}
  for row in res["retrieval"].values():
    assert row["rsum"] > 50  # Chance on 200 images is ~16.
  recs = [json.loads(x) for x in (w / "distill" / "metrics.jsonl").read_text().splitlines()]
  assert {"loss/si_st_kl", "loss/ti_si_fd", "loss/tt_st_fd", "loss/si_st_infonce"} <= set(recs[-1])
  fus = [json.loads(x) for x in (w / "fusion_teacher" / "metrics.jsonl").read_text().splitlines()]
  assert "loss/twin_softmax" in fus[-1] and "twin_acc/relation" in fus[-1]
  for line in ("teacher", "fusion_teacher", "student"):
    assert line in r.stdout
  # Export: every file verified against JAX, builtin ops only, int8 close to JAX in retrieval.
  exp = res["export"]
  names = {f"student_{e}_{f}.tflite" for e in ("image", "text") for f in ("fp32", "int8", "npu")}
  assert names | {"student_image.onnx", "student_text.onnx"} == set(exp)
  for name, rec in exp.items():
    assert (w / "export" / name).stat().st_size == rec["bytes"] > 0
    assert rec["cosine_min"] >= (0.99 if ("int8" in name or "npu" in name) else 0.999), (name, rec)
    # Only the npu files are static full-integer (export/npu.py); the int8 files are hybrid.
    assert rec.get("npu_ready", False) == ("npu" in name), (name, rec)
    assert rec["ops"] and not any(o.startswith(("CUSTOM", "Flex")) for o in rec["ops"])
  assert exp["student_image_int8.tflite"]["bytes"] < 0.5 * exp["student_image_fp32.tflite"]["bytes"]
  assert res["retrieval"]["student_fp32"] == pytest.approx(res["retrieval"]["student"], abs=0.5)
  for k in ("i2t_r1", "t2i_r1"):
    for row in ("student_int8", "student_npu"):
      assert abs(res["retrieval"][row][k] - res["retrieval"]["student"][k]) <= 2.0, (row, k)
  assert exp["student_image_npu.tflite"]["io"] == {"input": ["INT8"], "output": ["INT8"]}
  report = (w / "export" / "report.md").read_text()
  assert "student_int8" in report and "NPU readiness" in report
  # The search CLI answers from the int8 text encoder and the int8 index.
  q = subprocess.run([sys.executable, "-m", "export.search", "--workdir", str(w), "-k", "3",
                      "a red circle"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert q.returncode == 0, q.stderr[-2000:]
  hits = [ln for ln in q.stdout.splitlines() if "image #" in ln]
  assert len(hits) == 3
  # With the gallery streamed from disk (bounded memory), the same hits.
  qs = subprocess.run([sys.executable, "-m", "export.search", "--workdir", str(w), "-k", "3",
                       "--memory", "stream", "a red circle"], cwd=ROOT, capture_output=True,
                      text=True, timeout=120)
  assert qs.returncode == 0, qs.stderr[-2000:]
  assert [ln for ln in qs.stdout.splitlines() if "image #" in ln] == hits
  # Export alone on the finished workdir, with other formats: results.json gains its rows.
  e = subprocess.run([sys.executable, "-m", "export", "--workdir", str(w), "--formats", "fp16",
                      "--no-onnx", "--reeval", "fp16"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert e.returncode == 0, e.stderr[-2000:]
  res = json.loads((w / "results.json").read_text())
  assert set(res["export"]) == {"student_image_fp16.tflite", "student_text_fp16.tflite"}
  assert "student_fp16" in res["retrieval"] and "teacher" in res["retrieval"]


def test_export_cli_rejects_a_bad_workdir(tmp_path):
  r = subprocess.run([sys.executable, "-m", "export", "--workdir", str(tmp_path / "nope")], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "config.json" in r.stderr
  s = subprocess.run([sys.executable, "-m", "export.search", "--workdir", str(tmp_path), "a query"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert s.returncode == 2 and "run the export stage" in s.stderr


def test_tensorboard_scalars_match_metrics_jsonl(uninterrupted):
  """tensorboardX's event files read back with TensorFlow's own reader."""
  import tensorflow as tf

  w, _ = uninterrupted
  files = list((w / "teacher" / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  tb = {}
  for ev in tf.compat.v1.train.summary_iterator(str(files[0])):
    for v in ev.summary.value:
      if v.tag == "training_loss":
        tb[ev.step] = v.simple_value
  want = losses_by_step(w)
  assert sorted(tb) == sorted(want)
  np.testing.assert_allclose([tb[k] for k in sorted(tb)], [want[k] for k in sorted(want)], rtol=1e-6)


def test_finished_stage_is_skipped(uninterrupted):
  w, _ = uninterrupted
  before = (w / "teacher" / "done.json").stat().st_mtime
  r = run_main(w, *STEPS)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "already finished" in r.stderr
  assert (w / "teacher" / "done.json").stat().st_mtime == before


def _logged_steps(w) -> int:
  try:
    return len((w / "teacher" / "metrics.jsonl").read_text().splitlines())
  except FileNotFoundError:
    return 0


def test_sigkill_then_rerun_resumes_exactly(uninterrupted, tmp_path):
  full, _ = uninterrupted
  w = tmp_path / "killed"
  proc = subprocess.Popen(main_cmd(w, *STEPS), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  at = random.Random().randint(5, 110)  # A random step: maybe mid-save, maybe between saves.
  deadline = time.time() + 300
  while time.time() < deadline and _logged_steps(w) < at and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (w / "teacher" / "done.json").exists(), f"the run finished before step {at}"
  ck = w / "teacher" / "checkpoints"
  saved = ck.exists() and any(p.name.isdigit() for p in ck.iterdir())
  r = run_main(w, *STEPS)
  assert r.returncode == 0, r.stderr[-3000:]
  if not saved:  # Killed before the first checkpoint: the rerun starts from scratch.
    assert "resumes from step" not in r.stderr, at
  step_a, pa = final_params(full)
  step_b, pb = final_params(w)
  assert step_a == step_b == 120
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(a, b)
  # Same data order: every step's loss is the same, before and after the kill.
  assert losses_by_step(full) == losses_by_step(w)


@pytest.mark.slow  # ~55 s; SIGKILL-and-resume stays in the default suite
def test_sigterm_saves_at_that_step_and_rerun_resumes_exactly(uninterrupted, tmp_path):
  """Preemption: SIGTERM at a random step -> checkpoint of that step, exit 143, exact resume."""
  full, _ = uninterrupted
  w = tmp_path / "preempted"
  at = random.Random().randint(5, 100)
  proc = subprocess.Popen(main_cmd(w, *STEPS), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and _logged_steps(w) < at and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=300)[1]
  assert proc.returncode == 143, (at, err[-2000:])
  assert "preempted" in err and "Traceback" not in err
  assert not (w / "teacher" / "done.json").exists()
  step, _ = final_params(w)
  assert at <= step < 120, (at, step)  # Saved where it stopped, not at the last multiple of 20.
  r = run_main(w, *STEPS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumes from step {step}" in r.stderr
  _, pa = final_params(full)
  _, pb = final_params(w)
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses_by_step(full) == losses_by_step(w)


def test_nan_loss_stops_with_step_and_keeps_good_checkpoint(tmp_path, tiny_data):
  del tiny_data
  w = tmp_path / "nan"
  r = run_main(w, "--config.stages=('teacher',)", "--config.teacher.steps=40", "--config.ckpt_every=1",
               "--config.teacher.optim.lr=1e30", "--config.teacher.optim.warmup_steps=10",
               "--config.teacher.optim.clip_norm=1e30")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "at step" in r.stderr and "stopping" in r.stderr
  assert "Traceback" not in r.stderr
  step, params = final_params(w)
  assert step >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert not (w / "teacher" / "done.json").exists()


def test_corrupt_or_partial_latest_checkpoint_falls_back(tmp_path, caplog):
  from mcad_jax import checkpoint

  mesh_state = {"w": np.arange(6.0), "step": np.int32(0)}
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
  ck.save(1, {"w": np.arange(6.0), "step": np.int32(1)}, {"iter": {"next_index": 1}})
  ck.save(2, {"w": np.arange(6.0) * 2, "step": np.int32(2)}, {"iter": {"next_index": 2}})
  ck.wait()
  # Truncate every data file of the newest checkpoint.
  for dirpath, _, files in os.walk(tmp_path / "ck" / "2"):
    for name in files:
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(3)
  # A save cut off by a kill leaves only orbax's temporary directory: it must be ignored.
  partial = tmp_path / "ck" / "3.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (partial / "junk").write_bytes(b"\x00")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          mesh_state)
  with caplog.at_level("WARNING"):
    step, state, data = ck.restore_latest(abstract)
  assert step == 1 and data == {"iter": {"next_index": 1}}
  np.testing.assert_array_equal(state["w"], np.arange(6.0))
  assert "unreadable" in caplog.text
  assert any(p.name.startswith("corrupt-2") for p in (tmp_path / "ck").iterdir())  # Kept aside.
  # Training can go on and save step 2 again.
  ck.save(2, {"w": np.zeros(6), "step": np.int32(2)}, {"iter": {}})
  ck.close()


def test_tool_output_goes_to_the_run_log_file(tmp_path, capfd):
  """What a library writes to fds 1 and 2 (TF's C++ start-up lines while TFDS prepares a
  dataset) lands in the run's log file, not on the user's terminal; without a log file
  nothing is redirected."""
  import logging

  from mcad_jax import tool_output

  with tool_output.tool_output_to(None):
    os.write(2, b"no log file: stays on fd 2\n")
  assert "no log file: stays on fd 2" in capfd.readouterr().err
  path = str(tmp_path / "mcad_jax.log")
  logger = logging.getLogger("mcad_jax")
  handler = logging.FileHandler(path)
  logger.addHandler(handler)
  try:
    assert tool_output.run_log_file() == path
    with tool_output.tool_output_to(tool_output.run_log_file()):
      os.write(2, b"C++ banner on fd 2\n")
      os.write(1, b"banner on fd 1\n")
  finally:
    logger.removeHandler(handler)
    handler.close()
  out = capfd.readouterr()
  assert "banner" not in out.out + out.err
  text = pathlib.Path(path).read_text()
  assert "C++ banner on fd 2" in text and "banner on fd 1" in text
