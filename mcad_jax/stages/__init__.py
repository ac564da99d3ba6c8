"""Stage kinds: what each kind of stage trains, its init, loss, frozen inputs and evaluation.

One module per kind, all feeding the one train loop (`train.py`):
- `dual`: a two-tower model on a contrastive loss (the dual teacher, or a
  student trained alone);
- `fusion`: the single-stream teacher, on top of (by default frozen) dual towers;
- `distill`: a student trained from frozen teachers by a recipe (`mcad_jax/recipes/`).
`common` holds the `Stage` record and what the kinds share; `teachers` the frozen
teachers' forward passes (used by `distill` and the teacher-output cache).
"""

from mcad_jax.stages import distill, dual, fusion
from mcad_jax.stages.common import Stage, checkpoint_dir, dual_model, dummy_batch, restore_params, tokenizer  # noqa: F401

BUILDERS = {"dual": dual.dual_stage, "fusion": fusion.fusion_stage, "distill": distill.distill_stage}
VALIDATORS = {"dual": dual.validate, "fusion": fusion.validate, "distill": distill.validate}


def build(config, name: str, workdir: str, mesh) -> Stage:
  """The `Stage` of config section `name` (its `kind` picks the builder)."""
  scfg = config[name]
  if scfg.kind not in BUILDERS:
    raise ValueError(f"unknown stage kind {scfg.kind!r}; known {tuple(BUILDERS)}")
  return BUILDERS[scfg.kind](config, scfg, workdir, mesh)


def validate(config, name: str) -> None:
  """Checks config section `name` by its kind's own rules; raises config_lib.ConfigError."""
  VALIDATORS[config[name].kind](config, name, config[name])
