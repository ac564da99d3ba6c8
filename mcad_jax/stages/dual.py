"""The `dual` stage kind: a two-tower model on a contrastive loss.

The dual teacher, or a student trained alone with no teacher.
"""

from __future__ import annotations

from mcad_jax import losses
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, eval_dual, pretrained_init, tokenizer


def dual_stage(config, scfg, workdir: str, mesh) -> Stage:
  del workdir
  model = dual_model(config, scfg.model)
  img, txt = dummy_batch(config, model_cfg=scfg.model)

  def loss_fn(params, batch, rng, frozen, step=None):
    del rng, frozen, step
    zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["text"])
    loss = losses.contrastive(scfg.loss, zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
    return loss, {f"loss/{scfg.loss}": loss, "logit_scale": aux["logit_scale"]}

  return Stage(
      init=lambda rng: model.init(rng, img, txt)["params"],
      loss_fn=loss_fn,
      load_init=pretrained_init(config, scfg, model), tokenizer=tokenizer(config, scfg.model),
      evaluate=lambda params, mesh: eval_dual(config, model, params, mesh, scfg.report_as, scfg.model))
