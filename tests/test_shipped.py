"""The teacher weights shipped in the package: intact, loadable, and as good as RESULTS.md says.

The manifest records each stage's metrics on the first test scenes (built by the generator, no
TFDS); loading the shipped files must reproduce them.
"""

import jax
import pytest

from configs import shapes
from mcad_jax import checkpoint, sharding, shipped, stages, train


def test_manifest_checksums_hold():
  manifest = shipped.verify("shapes")
  assert set(manifest["stages"]) == {"teacher", "fusion_teacher"}
  assert manifest["command"].startswith("python -m mcad_jax.main --config=configs/shapes.py:teachers")


def test_demo_config_points_at_the_shipped_weights():
  c = shapes.get_config("demo")
  assert c.teacher.weights == shipped.path("shapes", "teacher")
  assert c.fusion_teacher.weights == shipped.path("shapes", "fusion_teacher")


# The fusion teacher's eval takes ~55 s on 2 cores: slow; the checksums above cover its files.
@pytest.mark.parametrize("stage", ["teacher", pytest.param("fusion_teacher", marks=pytest.mark.slow)])
def test_shipped_weights_reproduce_their_small_eval(stage):
  manifest = shipped.verify("shapes")
  want = manifest["small_eval"]["metrics"][stage]
  config = shapes.get_config("demo")
  mesh = sharding.make_mesh(config.mesh)
  st = stages.build(config, stage, "", mesh)
  _, _, abstract = train.abstract_state(st, config[stage], config, mesh)
  params = checkpoint.load_params(shipped.path("shapes", stage), abstract["params"])
  got = shipped.small_eval_metrics(config, stage, jax.device_get(params),
                                   manifest["small_eval"]["images"])
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=0.5), key
  if stage == "fusion_teacher":  # The premise of MCAD: it knows binding.
    assert got["hn_relation"] >= 85 and got["hn_attribute"] >= 85
