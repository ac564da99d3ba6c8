"""The `dual` stage kind: a two-tower model on a contrastive loss.

The dual teacher, or a student trained alone with no teacher. With `hard_columns`
(shapes), each image's canonical caption also competes with its relation and
attribute twins in one softmax (NegCLIP-style hard negatives), so a dual teacher
can be trained on the same binding signal the fusion teacher sees.
"""

from __future__ import annotations

from mcad_jax import config_lib as cl, losses
from mcad_jax.recipes import hard_columns
from mcad_jax.stages.common import Stage, dual_model, dummy_batch, eval_dual, pretrained_init, tokenizer


def dual_stage(config, scfg, workdir: str, mesh) -> Stage:
  del workdir
  model = dual_model(config, scfg.model)
  img, txt = dummy_batch(config, model_cfg=scfg.model)
  hard = bool(scfg.get("hard_columns", False))

  def loss_fn(params, batch, rng, frozen, step=None):
    del rng, frozen, step
    zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["text"])
    loss = losses.contrastive(scfg.loss, zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
    terms = {f"loss/{scfg.loss}": loss, "logit_scale": aux["logit_scale"]}
    if hard:
      enc = lambda ids: model.apply({"params": params}, ids, method=model.encode_text)[0]
      g = hard_columns.hard_logits(enc, zimg, batch, aux["logit_scale"])
      valid, row_w = hard_columns.hard_valid(batch)
      terms["loss/hard_softmax"] = losses.candidate_softmax(g, valid, row_w)
      terms["hard_acc"] = hard_columns.hard_accuracy(g, valid)
      loss = loss + scfg.hard_label_weight * terms["loss/hard_softmax"]
    return loss, terms

  return Stage(
      init=lambda rng: model.init(rng, img, txt)["params"],
      loss_fn=loss_fn,
      batch_keys=("image", "text") + (hard_columns.HARD_KEYS if hard else ()),
      load_init=pretrained_init(config, scfg, model), tokenizer=tokenizer(config, scfg.model),
      evaluate=lambda params, mesh: eval_dual(config, model, params, mesh, scfg.report_as, scfg.model))


def validate(config, name: str, s) -> None:
  """Checks this stage kind's own section `s` (named `name`); raises config_lib.ConfigError."""
  if s.get("hard_columns", False):
    cl.need(config.data.get("hard_negatives", False), f"{name}.hard_columns",
            "hard columns need data.hard_negatives=True (a dataset with twins: shapes)")
    cl.in_range(s.hard_label_weight, f"{name}.hard_label_weight", 0)
