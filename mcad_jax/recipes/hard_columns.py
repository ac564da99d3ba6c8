"""Hard columns (shapes): each image's canonical caption and its relation / attribute twins.

An in-batch similarity matrix almost never holds a caption beside its twin, so a student
cannot learn binding from it however good the teacher is. Every distilling recipe therefore
gets three extra columns per image, scored by its own teacher and distilled by KL over them
(`hard_weight`), optionally with the ground truth as a softmax on top (`hard_label_weight`,
our addition). With no teacher they are NegCLIP-style hard negatives. The dual teacher can
train on them too (`teacher.hard_columns`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcad_jax import losses

# Each image's hard captions: its canonical two-object caption, then the twins.
HARD_COLUMNS = ("true", "relation", "attribute")
HARD_KEYS = tuple(f"hn_{k}" for k in HARD_COLUMNS) + tuple(f"hn_{k}_valid" for k in HARD_COLUMNS)


def hard_logits(encode_text, zimg: jax.Array, batch, scale) -> jax.Array:
  """[B, 3] logits of each image against its canonical caption and its twins.

  Args:
    encode_text: token ids [3B, L] -> L2-normalised text embeddings [3B, E].
    zimg: the images' embeddings [B, E].
  """
  ids = jnp.concatenate([batch[f"hn_{k}"] for k in HARD_COLUMNS])
  zt = encode_text(ids)
  return scale * jnp.einsum("be,cbe->bc", zimg, zt.reshape(len(HARD_COLUMNS), *zimg.shape))


def hard_valid(batch) -> tuple[jax.Array, jax.Array]:
  """([B, 3] valid hard columns, [B] row weights): a row counts if it has a twin."""
  tv = batch["hn_true_valid"]
  valid = jnp.stack([tv] + [batch[f"hn_{k}_valid"] & tv for k in HARD_COLUMNS[1:]], 1)
  return valid, (jnp.sum(valid, 1) >= 2).astype(jnp.float32)


def hard_accuracy(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Share of valid twins that score below their canonical caption (training-batch hn accuracy)."""
  twins = valid[:, 1:]
  wins = (logits[:, :1] > logits[:, 1:]) & twins
  return jnp.sum(wins) / jnp.maximum(jnp.sum(twins), 1)


def teacher_hard_logits(tout: dict, batch: dict, fwd, frozen, cached: bool,
                        itm_weight: float) -> jax.Array:
  """[B, 3] teacher logits of each image's hard captions: scale * v.t (+ itm_weight * ITM).

  The dual teacher's similarity for every recipe; MCAD adds the fusion teacher's
  match logit (`itm_weight` > 0, `mcad.hard_itm_weight`: our addition). From the cache
  (`teacher_hard_t`, `teacher_hard_itm`) or computed online from the batch's hard caption ids.
  """
  if cached:
    t_hard = tout["hard_t"]                                        # [B, 3, E]
    itm = tout.get("hard_itm")
  else:
    # Each teacher reads the hard captions in its own tokenizer's ids.
    ids = jnp.concatenate([batch[fwd.key(f"hn_{k}", "dual")] for k in HARD_COLUMNS])
    fkey = fwd.key("hn_true", "fusion")
    fids = (jnp.concatenate([batch[fwd.key(f"hn_{k}", "fusion")] for k in HARD_COLUMNS])
            if fkey is not None else None)
    t, ttok = fwd.text(frozen, ids, fids)
    b = tout["v"].shape[0]
    t_hard = t.reshape(len(HARD_COLUMNS), b, -1).swapaxes(0, 1)
    itm = None
    if itm_weight and fwd.fuse is not None:
      itok = jnp.concatenate([tout["tokens"][0]] * len(HARD_COLUMNS))
      itm = fwd.fuse(frozen, itok, *ttok)[1].reshape(len(HARD_COLUMNS), b).T
  logits = tout["scale"] * jnp.einsum("be,bce->bc", tout["v"], t_hard)
  if itm_weight and itm is not None:
    logits = logits + itm_weight * itm
  return jax.lax.stop_gradient(logits)


def add_distill_terms(total, student_logits, teacher_logits, valid, row_w, dcfg):
  """`total` plus the hard columns' terms with a teacher, and those terms: KL to the teacher's
  scores (`hard_weight`), then the ground truth's softmax when `hard_label_weight` is set."""
  terms = {"loss/hard_kl": losses.kl_candidates(teacher_logits, student_logits, valid, row_w)}
  total = total + dcfg.hard_weight * terms["loss/hard_kl"]
  if dcfg.get("hard_label_weight", 0.0):
    terms["loss/hard_softmax"] = losses.candidate_softmax(student_logits, valid, row_w)
    total = total + dcfg.hard_label_weight * terms["loss/hard_softmax"]
  return total, terms
