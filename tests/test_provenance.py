"""What a rerun may keep of a workdir: `provenance.plan` over real stage records on disk."""

import json

import pytest

from configs import shapes
from mcad_jax import provenance


def _finished(config, w):
  """Every stage of `config` recorded and finished in workdir `w`, as `train.run_stages` leaves it."""
  for name in config.stages:
    (w / name).mkdir(parents=True, exist_ok=True)
    (w / name / "config.json").write_text(json.dumps(provenance.record(config, name)))
    (w / name / "done.json").write_text("{}")


def _changed(**overrides):
  c = shapes.get_config("smoke")
  for key, value in overrides.items():
    *path, last = key.split("__")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


def test_plan_keeps_continues_redoes_and_refuses(tmp_path):
  base = shapes.get_config("smoke")
  assert list(base.stages) == ["teacher", "fusion_teacher", "distill", "export"]
  assert set(provenance.plan(base, str(tmp_path)).values()) == {provenance.NEW}
  _finished(base, tmp_path)
  keep = dict.fromkeys(base.stages, provenance.KEEP)
  assert provenance.plan(base, str(tmp_path)) == keep
  # Speed, evaluation size, where the data lives, log cadence: nothing made changes.
  assert provenance.plan(_changed(data__eval_limit=7, data__data_dir="/elsewhere", log_every=3),
                         str(tmp_path)) == keep

  # Raised steps: the stage continues; every stage that reads it, directly or not, is redone.
  steps = base.teacher.steps + 10
  assert provenance.plan(_changed(teacher__steps=steps), str(tmp_path)) == {
      "teacher": provenance.CONTINUE, "fusion_teacher": provenance.REDO,
      "distill": provenance.REDO, "export": provenance.REDO}

  with pytest.raises(provenance.ConfigChanged, match=r"finished stage 'teacher'.*"
                     r"teacher\.model\.embed_dim: 64 -> 48.*--accept_config_change"):
    provenance.plan(_changed(teacher__model__embed_dim=48), str(tmp_path))
  with pytest.raises(provenance.ConfigChanged, match=r"teacher\.steps: \d+ -> 1\b"):
    provenance.plan(_changed(teacher__steps=1), str(tmp_path))  # Fewer steps than it trained.
  assert provenance.plan(_changed(teacher__model__embed_dim=48), str(tmp_path), accept=True) == \
      dict.fromkeys(base.stages, provenance.REDO)

  # A change to the student leaves the teachers alone.
  lr = base.distill.optim.lr * 2
  with pytest.raises(provenance.ConfigChanged, match="'distill'.*distill.optim.lr"):
    provenance.plan(_changed(distill__optim__lr=lr), str(tmp_path))
  assert provenance.plan(_changed(distill__optim__lr=lr), str(tmp_path), accept=True) == {
      "teacher": provenance.KEEP, "fusion_teacher": provenance.KEEP,
      "distill": provenance.REDO, "export": provenance.REDO}


def test_part_trained_stage_is_checked_too(tmp_path):
  base = shapes.get_config("smoke")
  (tmp_path / "teacher" / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "teacher" / "config.json").write_text(json.dumps(provenance.record(base, "teacher")))
  with pytest.raises(provenance.ConfigChanged, match="part-trained stage 'teacher'"):
    provenance.plan(_changed(seed=base.seed + 1), str(tmp_path))
