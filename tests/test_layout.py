"""The code's layering: the library never reaches up to the exporter, the orchestration or the
benchmarks, and configs import no trainer code."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The orchestration and the entry points: the only modules of the package that may reach up.
TOP = {"mcad_jax/run.py", "mcad_jax/main.py"}
UP = ("export", "benchmarks", "mcad_jax.run", "mcad_jax.main")


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_library_never_imports_the_exporter_the_orchestration_or_benchmarks():
  bad = []
  for path in sorted((ROOT / "mcad_jax").rglob("*.py")):
    rel = str(path.relative_to(ROOT))
    if rel in TOP:
      continue
    bad += [f"{rel}: {m}" for m in _imports(path) if m.split(".")[0] in UP[:2] or m in UP[2:]]
  assert not bad, bad


def test_configs_and_library_import_light():
  """Importing a config loads no trainer code; importing the train loop loads no TensorFlow,
  exporter or orchestration (checked in a fresh interpreter)."""
  code = ("import sys; from configs import shapes, coco, flickr30k; shapes.get_config(''); "
          "a = sorted(m for m in sys.modules if m.startswith(('mcad_jax.train', 'mcad_jax.stages', "
          "'jax', 'flax'))); import mcad_jax.train, mcad_jax.stages, mcad_jax.evaluate; "
          "b = sorted(m for m in sys.modules if m.split('.')[0] in ('export', 'benchmarks', "
          "'tensorflow') or m in ('mcad_jax.run', 'mcad_jax.main')); print(a, b)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == "[] []", out
