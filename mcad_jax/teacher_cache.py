"""Teacher-output cache: per-example teacher outputs computed once, read at each step.

MobileCLIP-style dataset reinforcement: what depends on one example only (the
teacher image embedding v_i, the text embedding t_ic of each of its captions,
and the fused feature f_ic of each matched (image, caption) pair) is computed
once over the training split and stored as .npy arrays next to the dataset, in
`<data_dir>/mcad_teacher_cache/<dataset>/<fingerprint>/`. The fingerprint
hashes the teacher params and the preprocessing, so a different teacher never
reads a stale cache. Distillation then runs with no teacher forward pass.

It needs deterministic preprocessing (`data.augment=False`) and pair-local
teacher outputs, so MCAD's `all_pairs` mode (ITM over B^2 pairs) is online only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import jax
import numpy as np

from mcad_jax import evaluate
from mcad_jax.data import pipeline, tokenizer as tokenizers
from mcad_jax.recipes.hard_columns import HARD_COLUMNS

log = logging.getLogger(__name__)


def fingerprint(config, frozen, hard: bool = False, tokenizer_names=()) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([config.data.tfds_name, config.data.train_split, config.data.image_size,
                       config.data.text_len, *tokenizer_names] + (["hard"] if hard else [])).encode())
  for leaf in jax.tree.leaves(frozen):
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()[:16]


def cache_root(config, cache_dir: str = "") -> str:
  """`cache_dir` (the stage's `cache_dir`), or `mcad_teacher_cache` in the dataset's data dir."""
  base = os.path.expanduser(cache_dir) if cache_dir else os.path.join(
      config.data.data_dir or os.environ.get("TFDS_DATA_DIR")
      or os.path.expanduser("~/tensorflow_datasets"), "mcad_teacher_cache")
  return os.path.join(base, config.data.tfds_name.replace("/", "_"))


class TeacherCache:
  """Memory-mapped teacher outputs indexed by (example index, caption index)."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    self.keys = tuple(self.meta["keys"])
    # Keys with one row per (example, caption); the rest have one row per example.
    self.per_caption = tuple(self.meta.get("per_caption", ("t", "f")))
    self.arrays = {k: np.load(os.path.join(directory, f"{k}.npy"), mmap_mode="r") for k in self.keys}
    self.directory = directory

  def lookup(self, batch: dict) -> dict:
    """Adds teacher_<key> rows for the batch's (index, cap) pairs."""
    idx, cap = batch["index"], batch["cap"]
    out = dict(batch)
    for k, arr in self.arrays.items():
      out[f"teacher_{k}"] = np.asarray(arr[idx, cap] if k in self.per_caption else arr[idx])
    return out

  @classmethod
  def build(cls, config, frozen, fwd, mesh, hard: bool = False, cache_dir: str = "") -> TeacherCache:
    """Loads the cache for these teachers, computing it first if it is missing.

    With `hard`, it also holds each example's hard captions' teacher outputs
    (`hard_t`, and `hard_itm` with a fusion teacher; see distill.teacher_hard_logits).
    """
    if config.data.augment:
      raise ValueError("the teacher cache needs deterministic preprocessing: set data.augment=False")
    names = [t.name for t in fwd.tokenizers.values() if t]
    directory = os.path.join(cache_root(config, cache_dir), fingerprint(config, frozen, hard, names))
    if os.path.exists(os.path.join(directory, "meta.json")):
      log.info("Teacher cache: %s", directory)
      return cls(directory)
    t0 = time.time()
    log.info("Teacher cache: computing the teacher outputs of %s:%s once, into %s",
             config.data.tfds_name, config.data.train_split, directory)
    arrays = compute(config, frozen, fwd, mesh, hard=hard)
    if jax.process_index() == 0:
      tmp = directory + f".tmp{os.getpid()}"
      os.makedirs(tmp, exist_ok=True)
      for k, a in arrays.items():
        np.save(os.path.join(tmp, f"{k}.npy"), a)
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"keys": list(arrays), "per_caption": ["t", "f"], "examples": int(len(arrays["v"])),
                   "seconds": time.time() - t0}, f)
      if os.path.exists(directory):
        shutil.rmtree(directory)
      os.replace(tmp, directory)  # Complete or absent: never half a cache.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mcad_jax:teacher_cache")
    log.info("Teacher cache built in %.0f s: %s", time.time() - t0, directory)
    return cls(directory)


def compute(config, frozen, fwd, mesh, limit: int | None = None, tokenizer=None,
            hard: bool = False) -> dict[str, np.ndarray]:
  """Teacher outputs over the training split, in record order.

  Args:
    tokenizer: the dual teacher's tokenizer; defaults to `fwd.tokenizers['dual']`, then to the
      one `config.data` names. The fusion teacher reads the ids of `fwd.tokenizers['fusion']`.
    hard: also the hard captions' outputs: 'hard_t' [N, 3, E] (+ 'hard_itm' [N, 3]).
  Returns {'v': [N, E], 't': [N, 5, E]} plus 'f': [N, 5, F] when there is a fusion teacher.
  """
  tok = tokenizer or fwd.tokenizers.get("dual") or tokenizers.for_data(config.data)
  ftok = fwd.tokenizers.get("fusion")
  ftok = ftok if ftok is not None and ftok.name != tok.name else None
  src = pipeline.data_source(config.data, config.data.train_split)
  ad = pipeline.adapter(config.data.tfds_name)
  n = len(src) if limit is None else min(limit, len(src))
  bs = config.eval_batch_size
  c = pipeline.NUM_EVAL_CAPTIONS
  outs: dict[str, list[np.ndarray]] = {"v": [], "t": [], "f": [], "hard_t": [], "hard_itm": []}
  img_fn = lambda p, x: fwd.image(p, x)
  # With a fusion tokenizer of its own, its ids ride beside the dual teacher's: one array.
  txt_fn = lambda p, x: fwd.text(p, x[:, :tok.max_len], x[:, tok.max_len:] if ftok else None)
  encode = lambda texts: np.concatenate(  # noqa: E731
      [tok.encode_batch(texts)] + ([ftok.encode_batch(texts)] if ftok else []), axis=1)
  fuse_fn = lambda p, it, tt, tm: fwd.fuse(p, it, tt, tm)[0]  # One object: one compile.
  itm_fn = lambda p, it, tt, tm: fwd.fuse(p, it, tt, tm)[1]
  for s in range(0, n, bs):
    exs = [src[i] for i in range(s, min(n, s + bs))]
    images = np.stack([pipeline.resize_crop(e["image"], config.data.image_size, None) for e in exs])
    caps = [[pipeline._as_str(x) for x in pipeline._get(e, ad.captions_key)][:c] for e in exs]
    caps = [cs + [cs[-1]] * (c - len(cs)) for cs in caps]  # Pad short lists; never sampled.
    ids = encode([x for cs in caps for x in cs])
    v, itok = evaluate.embed_all(img_fn, frozen, images.astype(np.uint8), bs, mesh)
    t, ttok = evaluate.embed_all(txt_fn, frozen, ids, bs * c, mesh)
    outs["v"].append(np.asarray(v))
    outs["t"].append(np.asarray(t).reshape(len(exs), c, -1))
    if fwd.fuse is not None:
      rows = np.repeat(np.arange(len(exs)), c)
      f = evaluate.batched_pairs(fuse_fn, frozen, itok, ttok[0], ttok[1], rows,
                                 np.arange(len(rows)), bs * c)
      outs["f"].append(f.reshape(len(exs), c, -1))
    if hard:
      hids = encode([pipeline._as_str(e[f"hn_{k}"]) for k in HARD_COLUMNS for e in exs])
      th, htok = evaluate.embed_all(txt_fn, frozen, hids, bs * 3, mesh)
      outs["hard_t"].append(np.asarray(th).reshape(3, len(exs), -1).swapaxes(0, 1))
      if fwd.fuse is not None:
        rows = np.tile(np.arange(len(exs)), 3)
        itm = evaluate.batched_pairs(itm_fn, frozen, itok, htok[0], htok[1], rows,
                                     np.arange(len(rows)), bs * 3)
        outs["hard_itm"].append(itm.reshape(3, len(exs)).T)
  return {k: np.concatenate(v).astype(np.float32) for k, v in outs.items() if v}
