"""Faults and bad input, as a user meets them: one line, the right exit code, nothing lost.

Each case is a fault x what must happen: the exit code, a fragment of the one
line printed, no Python traceback, which files are intact, and that the rerun
ends with the same results as the uninterrupted run (conftest's `uninterrupted`).
The runs are `python -m mcad_jax.main` subprocesses on the `tiny` data, mostly
of the teacher stage alone.
"""

import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_main import ROOT, STEPS, _logged_steps, final_params, losses_by_step, main_cmd, run_main

TEACHER = ["--config.stages=('teacher',)", "--config.teacher.steps=40"]


def one_line_failure(r, code: int, *fragments: str) -> str:
  """The run exited `code` with a last stderr line 'mcad_jax: ...' holding every fragment."""
  assert r.returncode == code, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("mcad_jax: "), r.stderr[-2000:]
  for f in fragments:
    assert f in last, (f, last)
  return last


def same_as_uninterrupted(full, w) -> None:
  """Same final params and the same loss at every step as the uninterrupted run."""
  step_a, pa = final_params(full)
  step_b, pb = final_params(w)
  assert step_a == step_b
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses_by_step(full) == losses_by_step(w)
  ra = json.loads((full / "results.json").read_text())["retrieval"]
  rb = json.loads((w / "results.json").read_text())["retrieval"]
  assert ra == rb


def ckpt_steps(w, stage="teacher") -> list[int]:
  d = w / stage / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


# ----------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize("args,fragments", [
    (["--config=configs/nope.py"], ["--config", "No such file", "configs/nope.py"]),
    (["--config=configs/shapes.py:nosuchvariant"],
     ["--config=configs/shapes.py:nosuchvariant", "unknown shapes variant", "'smoke'"]),
    # Not prepared in the tests' TFDS dir, and no folder to prepare it from.
    (["--config=configs/flickr30k.py"],
     ["data.manual_dir", "not prepared", "dataset_flickr30k.json", "flickr30k-images/"]),
    (["--config.distill.mcad.alpha=nan"], ["distill.mcad.alpha", "finite"]),
    (["--config.teacher.optim.lr=inf"], ["teacher.optim.lr", "finite"]),
    (["--config.teacher.optim.weight_decay=-0.1"], ["teacher.optim.weight_decay", "-0.1"]),
    (["--config.teacher.optim.b2=1.5"], ["teacher.optim.b2"]),
    (["--config.teacher.init_from=/nonexistent/ckpt"], ["teacher.init_from", "/nonexistent/ckpt"]),
    # 8 fake devices (conftest): a batch of 60 or eval batch of 100 does not split over them.
    (["--config.teacher.batch_size=60"], ["teacher.batch_size", "8 devices"]),
    (["--config.eval_batch_size=100"], ["eval_batch_size", "8 devices"]),
    (["--config.data.source=generate", "--config.data.tfds_name=coco_captions"],
     ["data.source", "coco_captions", "data.source='tfds'"]),
    ("workdir-under-a-file", ["--workdir", "cannot create"]),
])
def test_bad_input_exits_2_naming_it(tmp_path, args, fragments):
  w = tmp_path / "w"
  if args == "workdir-under-a-file":  # Fails for root too, unlike a read-only parent.
    (tmp_path / "file").write_text("")
    w, args = tmp_path / "file" / "w", []
  config = [a for a in args if a.startswith("--config=")]
  overrides = [a for a in args if not a.startswith("--config=")]
  r = subprocess.run(main_cmd(w, *overrides, *TEACHER) if not config else
                     [sys.executable, "-m", "mcad_jax.main", *config, f"--workdir={w}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  one_line_failure(r, 2, *fragments)
  assert not (w / "teacher").exists()  # Before any compute.


def test_flickr30k_folder_without_its_files_exits_2_naming_them(tmp_path):
  folder = tmp_path / "flickr30k"
  (folder / "flickr30k-images").mkdir(parents=True)
  r = subprocess.run([sys.executable, "-m", "mcad_jax.main", "--config=configs/flickr30k.py",
                      f"--workdir={tmp_path / 'w'}", f"--config.data.manual_dir={folder}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  last = one_line_failure(r, 2, "data.manual_dir", str(folder), "has no dataset_flickr30k.json")
  assert "has no dataset_flickr30k.json or" not in last  # The images folder is there.


# ----------------------------------------------------------------------------- config provenance


@pytest.mark.slow  # Five runs of the pipeline (~3 min); `make test-slow` (CI runs it). The plan's
# decisions themselves are checked fast in tests/test_provenance.py.
def test_rerun_with_another_config_refused_raised_steps_continue(tmp_path, tiny_data):
  """One workdir through the reruns a user makes after a finished teacher stage.

  1. A change that alters what the stage computed exits 2 naming the key (old -> new) and the
     way out; config.json, results.json and the stage's record stay as they were.
  2. A change in a key that alters nothing made (log cadence) passes.
  3. Raised steps continue from the last checkpoint and the results say the new count.
  4. --accept_config_change retrains the stage with the new config.
  """
  del tiny_data
  w = tmp_path / "w"
  base = ["--config.stages=('teacher',)", "--config.teacher.steps=20", "--config.ckpt_every=10"]
  r = run_main(w, *base)
  assert r.returncode == 0, r.stderr[-3000:]
  kept = {p: (w / p).read_bytes() for p in ("config.json", "results.json", "teacher/config.json")}
  assert json.loads(kept["teacher/config.json"])["teacher.steps"] == 20

  r = run_main(w, *base, "--config.teacher.model.embed_dim=48")
  one_line_failure(r, 2, "'teacher'", "teacher.model.embed_dim: 64 -> 48", "new --workdir",
                   "--accept_config_change")
  assert {p: (w / p).read_bytes() for p in kept} == kept

  r = run_main(w, *base, "--config.log_every=7")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "already finished" in r.stderr

  r = run_main(w, *base[:-2], "--config.teacher.steps=30", "--config.ckpt_every=10")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumes from step 20" in r.stderr, r.stderr[-3000:]
  res = json.loads((w / "results.json").read_text())
  assert res["stages"]["teacher"]["steps"] == 30
  logged = [json.loads(x)["step"] for x in (w / "teacher" / "metrics.jsonl").read_text().splitlines()]
  assert logged[-1] == 30 and logged == sorted(set(logged)) and ckpt_steps(w)[-1] == 30
  assert json.loads((w / "teacher" / "config.json").read_text())["teacher.steps"] == 30
  assert len(list((w / "configs").iterdir())) == 3  # The refused run's config is not kept.

  r = run_main(w, *base, "--config.teacher.model.embed_dim=48", "--accept_config_change")
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads((w / "teacher" / "config.json").read_text())
  assert rec["teacher.model.embed_dim"] == 48 and rec["teacher.steps"] == 20
  assert json.loads((w / "results.json").read_text())["stages"]["teacher"]["steps"] == 20


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("key", ["weights", "init_from"])
def test_checkpoint_of_another_model_lists_the_parameters(uninterrupted, tmp_path, key):
  full, _ = uninterrupted
  ck = full / "teacher" / "checkpoints"
  r = run_main(tmp_path / "w", *TEACHER, f"--config.teacher.{key}={ck}",
               "--config.teacher.model.embed_dim=32")
  last = one_line_failure(r, 1, "of another model", "shapes differ", str(ck))
  assert "img_head/kernel (64, 64) vs (64, 32)" in last, last
  assert not (tmp_path / "w" / "teacher" / "done.json").exists()


def _fsize_limited(cmd, kib: int):
  """`cmd` run with files capped at `kib` KiB (RLIMIT_FSIZE, which binds root too); a write past
  it fails with EFBIG instead of killing the process with SIGXFSZ. A shell sets the limit, not a
  preexec_fn, which would fork this multithreaded (JAX) process."""
  return ["bash", "-c", f"trap '' XFSZ; ulimit -f {kib}; exec \"$@\"", "bash", *cmd]


def test_lock_sigkill_then_failed_save_then_resume(uninterrupted, tmp_path):
  """One workdir through four faults in a row, ending with the uninterrupted run's results.

  1. A second run on a workdir in use exits 2 at once, naming the holder's pid.
  2. SIGKILL leaves no stale lock.
  3. A checkpoint save that fails (files capped at 1 MB: 'disk full' without root) stops the run
     with one line naming the directory and the cause; the earlier checkpoints stay readable.
  4. The rerun resumes from the newest complete checkpoint and matches the uninterrupted run.
  """
  from mcad_jax import workdir_lock

  full, _ = uninterrupted
  w = tmp_path / "w"
  a = subprocess.Popen(main_cmd(w, *STEPS), cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and _logged_steps(w) < 1 and a.poll() is None:
    time.sleep(0.05)
  t = time.time()
  b = run_main(w, *STEPS)
  one_line_failure(b, 2, "in use by another run", f"pid={a.pid}")
  assert time.time() - t < 60
  at = random.Random().randint(45, 90)
  while time.time() < deadline and _logged_steps(w) < at and a.poll() is None:
    time.sleep(0.01)
  a.send_signal(signal.SIGKILL)
  a.wait()
  assert not (w / "teacher" / "done.json").exists(), f"the run finished before step {at}"
  lock = workdir_lock.WorkdirLock(str(w))
  lock.acquire()  # Not stale: the kernel dropped it with the process.
  lock.release()

  before = ckpt_steps(w)
  assert before and before[-1] >= 20, before
  r = subprocess.run(_fsize_limited(main_cmd(w, *STEPS), 1024), cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  last = one_line_failure(r, 1, "could not save step", str(w / "teacher" / "checkpoints"),
                          "File too large")
  failed = int(last.split("could not save step ")[1].split()[0])
  assert failed > before[-1]
  assert ckpt_steps(w) == before  # Nothing lost, nothing half-written listed.
  step, params = final_params(w)  # The newest one still reads.
  assert step == before[-1] and all(np.isfinite(x).all() for x in jax.tree.leaves(params))

  r = run_main(w, *STEPS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumes from step {before[-1]}" in r.stderr
  same_as_uninterrupted(full, w)


# ----------------------------------------------------------------------------- data


def test_corrupt_record_names_the_file_and_the_fix(tmp_path, tiny_data):
  import tensorflow_datasets as tfds

  from mcad_jax.data import shapes_builder  # noqa: F401 - registers the builder.

  src = pathlib.Path(os.environ["TFDS_DATA_DIR"]) / "shapes" / "tiny"
  data = tmp_path / "tfds"
  shutil.copytree(src, data / "shapes" / "tiny")
  train = next((data / "shapes" / "tiny").glob("*/shapes-train.array_record-*"))
  with open(train, "r+b") as f:  # Overwrite stretches of it: bad disk blocks.
    for k in (1, 2, 3):
      f.seek(train.stat().st_size * k // 4)
      f.write(b"\xff" * 4096)
  r = run_main(tmp_path / "w", *TEACHER, f"--config.data.data_dir={data}")
  one_line_failure(r, 1, str(train), "damaged", f"delete {train.parent}", "rerun")
  # Following the advice makes the next run prepare the dataset again.
  shutil.rmtree(train.parent)
  assert not tfds.builder(tiny_data.tfds_name, data_dir=str(data)).is_prepared()


def test_flickr30k_skips_and_counts_bad_images_and_empty_captions(tmp_path, caplog):
  from mcad_jax.data import pipeline
  from tests.test_flickr30k import data_config, make_karpathy

  root = tmp_path / "karpathy"
  make_karpathy(root)
  (root / "flickr30k-images" / "1001.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # train
  meta = json.loads((root / "dataset_flickr30k.json").read_text())
  meta["images"][2]["sentences"][0]["raw"] = "   "  # train: one empty caption of five
  meta["images"][8]["sentences"] = [{"raw": ""}]      # test: no caption left at all
  (root / "dataset_flickr30k.json").write_text(json.dumps(meta))
  data = data_config(tmp_path)
  with caplog.at_level(logging.WARNING):
    sizes = {s: len(pipeline.data_source(data, s)) for s in ("train", "validation", "test")}
  assert sizes == {"train": 4, "validation": 2, "test": 2}
  assert "flickr30k (train): skipped 1 of 5 images (1 unreadable" in caplog.text
  assert "1 empty captions" in caplog.text
  assert "flickr30k (test): skipped 1 of 3 images (0 unreadable" in caplog.text
  train = pipeline.data_source(data, "train")
  assert sorted(len(train[i]["captions"]) for i in range(4)) == [4, 5, 5, 5]


# ----------------------------------------------------------------------------- SIGKILL mid-stage


def _kill_when(proc, ready, max_delay=2.0, deadline_s=300):
  """SIGKILLs `proc` a random moment (up to `max_delay` s) after `ready()` turns true; False if it
  ended first."""
  deadline = time.time() + deadline_s
  while time.time() < deadline and not ready() and proc.poll() is None:
    time.sleep(0.05)
  time.sleep(random.Random().uniform(0, max_delay))
  alive = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return alive


EXPORT = ["--config.stages=('teacher', 'export')", "--config.export.source=teacher",
          "--config.export.formats=('fp32',)", "--config.export.onnx=False",
          "--config.export.reeval=('fp32',)", "--config.export.index_formats=('fp16',)",
          "--config.export.index_encoder=fp32"]


def test_sigkill_during_export_then_rerun(uninterrupted, tmp_path):
  """Killed while exporting: the rerun redoes the export; the fp32 student files match JAX."""
  full, _ = uninterrupted
  w = tmp_path / "w"
  shutil.copytree(full, w, ignore=shutil.ignore_patterns(".lock-*"))
  p = subprocess.Popen(main_cmd(w, *STEPS, *EXPORT), cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  assert _kill_when(p, lambda: (w / "export").exists()), "the export ended before the kill"
  assert not (w / "export" / "done.json").exists()
  r = run_main(w, *STEPS, *EXPORT)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((w / "results.json").read_text())
  assert res["retrieval"]["teacher"] == json.loads((full / "results.json").read_text())[
      "retrieval"]["teacher"]
  assert res["retrieval"]["student_fp32"] == pytest.approx(res["retrieval"]["teacher"], abs=0.5)
  for name, rec in res["export"].items():
    assert (w / "export" / name).stat().st_size == rec["bytes"] and rec["cosine_min"] >= 0.999
  assert not list((w / "export").glob("*.tmp*"))  # No temp file of the killed run is mistaken.


CACHE = ["--config.stages=('teacher', 'distill')", "--config.distill.recipe=clip_kd",
         "--config.distill.cache=True", "--config.distill.steps=10", "--config.log_every=1",
         "--config.distill.optim.warmup_steps=2", "--config.data.eval_limit=40"]


def _complete_caches(data: pathlib.Path) -> list[pathlib.Path]:
  """Finished teacher caches under a data dir (not the temporary directory of a killed build)."""
  return [m.parent for m in (data / "mcad_teacher_cache").glob("*/*/meta.json")
          if ".tmp" not in m.parent.name]


def _data_dir_with_tiny(d: pathlib.Path) -> pathlib.Path:
  """A TFDS data dir holding the prepared tiny set (linked), so its teacher cache is new."""
  d.mkdir()
  (d / "shapes").symlink_to(pathlib.Path(os.environ["TFDS_DATA_DIR"]) / "shapes")
  return d


@pytest.mark.slow  # ~70 s; `make test-slow` (CI runs it)
def test_sigkill_during_teacher_cache_build_then_rerun(uninterrupted, tmp_path):
  """Killed while building the teacher cache: no half cache is ever read; the rerun equals a run
  that built it uninterrupted."""
  full, _ = uninterrupted
  ref, w = tmp_path / "ref", tmp_path / "w"
  for d in (ref, w):
    shutil.copytree(full, d, ignore=shutil.ignore_patterns(".lock-*"))
  ref_data, data = _data_dir_with_tiny(tmp_path / "ref_tfds"), _data_dir_with_tiny(tmp_path / "tfds")
  r = run_main(ref, *STEPS, *CACHE, f"--config.data.data_dir={ref_data}")
  assert r.returncode == 0, r.stderr[-3000:]

  err = tmp_path / "stderr"
  with open(err, "w") as f:
    p = subprocess.Popen(main_cmd(w, *STEPS, *CACHE, f"--config.data.data_dir={data}"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=f)
    assert _kill_when(p, lambda: "Teacher cache: computing" in err.read_text(), max_delay=1.0)
  assert not (w / "distill" / "metrics.jsonl").exists(), "killed after the cache build"
  assert not _complete_caches(data)
  r = run_main(w, *STEPS, *CACHE, f"--config.data.data_dir={data}")
  assert r.returncode == 0, r.stderr[-3000:]
  [built], [ref_built] = _complete_caches(data), _complete_caches(ref_data)
  for f in sorted(ref_built.glob("*.npy")):
    np.testing.assert_array_equal(np.load(f), np.load(built / f.name))
  assert losses_by_step(ref, "distill") == losses_by_step(w, "distill")
