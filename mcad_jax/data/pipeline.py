"""One input pipeline for every dataset: TFDS data source -> preprocess -> tokenize -> batches.

Training batches come from grain over `tfds.data_source` (ArrayRecord, random
access). The order is a pure function of the seed: the shuffled, repeated
stream is split between JAX processes by striding, so process p of P reads
elements p, p+P, ... and global batch s holds exactly elements [s*B, (s+1)*B)
of the stream, whatever P is. The grain iterator state is a small JSON dict
saved with every checkpoint, so a resumed run continues the exact order.

Images stay uint8 until they reach the model, which scales and normalises them
(so exported encoders take raw pixels too).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import io
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np
from PIL import Image

from mcad_jax import tool_output
from mcad_jax.data import scenes
from mcad_jax.data.tokenizer import Tokenizer

NUM_EVAL_CAPTIONS = 5

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetAdapter:
  """How a TFDS dataset maps onto (image, captions).

  Attributes:
    module: module whose import registers the TFDS builder ('' for TFDS's own).
    captions_key: path to the list of captions, '/'-separated.
    hard_negatives: whether examples carry hn_true/hn_relation/hn_attribute.
  """

  module: str
  captions_key: str
  hard_negatives: bool = False


ADAPTERS = {
    "shapes": DatasetAdapter("mcad_jax.data.shapes_builder", "captions", hard_negatives=True),
    "coco_captions": DatasetAdapter("", "captions/text"),
    "flickr30k": DatasetAdapter("mcad_jax.data.flickr30k_builder", "captions"),
}


def adapter(tfds_name: str) -> DatasetAdapter:
  base = tfds_name.split("/")[0].split(":")[0]
  if base not in ADAPTERS:
    raise ValueError(f"no adapter for dataset {tfds_name!r}; known: {sorted(ADAPTERS)}")
  return ADAPTERS[base]


def _tfds():
  import tensorflow_datasets as tfds  # Lazy: TF is heavy and not needed by the model code.
  tfds.disable_progress_bar()
  return tfds


def ensure_prepared(data_cfg) -> None:
  """Prepares the dataset into the data dir on first use (process 0 first, then others)."""
  import importlib

  import jax

  ad = adapter(data_cfg.tfds_name)
  if ad.module:
    importlib.import_module(ad.module)
  tfds = _tfds()

  def prepare():
    # TFDS imports TensorFlow (building TFDS's own builders, preparing), whose C++ start-up lines
    # go to the run's log file.
    with _quiet_tfds(), tool_output.tool_output_to(tool_output.run_log_file()):
      builder = tfds.builder(data_cfg.tfds_name, data_dir=data_cfg.data_dir or None,
                             file_format="array_record")
      prepared = builder.is_prepared()
    if prepared:
      return
    log.info("Preparing %s into %s (first use).", data_cfg.tfds_name, builder.data_dir)
    t = time.time()
    manual = data_cfg.get("manual_dir") or None
    with _quiet_tfds(), tool_output.tool_output_to(tool_output.run_log_file()):
      try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual) if manual else None)
      except Exception as e:
        if manual or builder.MANUAL_DOWNLOAD_INSTRUCTIONS or isinstance(e, DataFault) or (
            isinstance(e, OSError) and e.errno == errno.ENOSPC):
          raise
        raise DataFault(_download_failed(data_cfg, builder, e)) from e
    log.info("Prepared %s in %.0f s.", data_cfg.tfds_name, time.time() - t)

  if jax.process_index() == 0:
    prepare()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mcad_jax:data_prepared")
    prepare()  # No-op on a shared disk; prepares on hosts with their own disk.


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS prints its preparation banner to stdout and absl warnings about folders it has not
  written yet: a user should see our own progress lines, so those are dropped (the banner is
  logged at DEBUG level, which our handlers do not show)."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      yield
  finally:
    absl_log.setLevel(level)
    if out.getvalue().strip():
      log.debug("TFDS: %s", out.getvalue().strip())


# What a dataset TFDS downloads itself fetches on first use, for the message when it cannot.
DOWNLOAD_SIZE = {"coco_captions": "about 20 GB of COCO images and captions"}


def _download_failed(data_cfg, builder, e: Exception) -> str:
  name = data_cfg.tfds_name.split("/")[0].split(":")[0]
  what = DOWNLOAD_SIZE.get(name, "its source files")
  cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  return (f"could not download {data_cfg.tfds_name} ({what}) to prepare it in {builder.data_dir}: "
          f"{cause}. On a machine that cannot reach its hosts, set --config.data.data_dir to a "
          f"TFDS data dir where {name} is already prepared (e.g. a copy on gs://)")


def unpreparable(data_cfg) -> str | None:
  """Why the dataset is neither prepared nor preparable from its manual folder, else None.

  For manual-download datasets (Flickr30K): checked before any compute, so a missing folder
  or file is one line naming them, not TFDS's assertion mid-run.
  """
  import importlib

  if data_cfg.get("source", "tfds") == "generate":  # Nothing to prepare, and no TensorFlow to ask.
    return None
  ad = adapter(data_cfg.tfds_name)
  if ad.module:
    importlib.import_module(ad.module)
  tfds = _tfds()
  with _quiet_tfds(), tool_output.tool_output_to(tool_output.run_log_file()):
    builder = tfds.builder(data_cfg.tfds_name, data_dir=data_cfg.data_dir or None,
                           file_format="array_record")
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or builder.is_prepared():
      return None
  files = tuple(getattr(builder, "MANUAL_FILES", ()))
  need = " and ".join(files) or builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
  folder = data_cfg.get("manual_dir") or ""
  if not folder:
    return (f"data.manual_dir: {data_cfg.tfds_name} is not prepared in {builder.data_dir} and is "
            f"prepared from files you place: set --config.data.manual_dir=DIR to a folder "
            f"holding {need}")
  missing = [f for f in files if not os.path.exists(os.path.join(folder, f.rstrip("/")))]
  if missing:
    return (f"data.manual_dir: {folder} has no {' or '.join(missing)}; "
            f"{data_cfg.tfds_name} is prepared from a folder holding {need}")
  return None


class DataFault(RuntimeError):
  """A prepared record that cannot be read: names the file and how to prepare it again."""


class CheckedSource(Sequence):
  """A TFDS data source whose read errors name the record's file and the fix.

  A corrupt ArrayRecord chunk surfaces from Riegeli as a bare "hash mismatch"
  RuntimeError (through grain's threads, too); this turns any failure to read
  or decode record i into a `DataFault` naming the file that holds it.
  """

  def __init__(self, src, name: str, split: str):
    self._src, self._name, self._split = src, name, split

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i):
    try:
      return self._src[i]
    except Exception as e:  # noqa: BLE001 - Riegeli, decoders and TF raise many kinds.
      raise DataFault(self._describe(int(i), e)) from e

  def _file_of(self, i: int) -> str | None:
    inner = getattr(self._src, "data_source", None)  # array_record's source: files + offsets.
    paths, sums = getattr(inner, "_paths", None), getattr(inner, "_prefix_sums", None)
    if not paths:
      return None
    if sums and len(sums) == len(paths):
      return paths[min(bisect.bisect_right(sums, i % sums[-1]), len(paths) - 1)]
    return paths[0] if len(paths) == 1 else None

  def _describe(self, i: int, e: Exception) -> str:
    f = self._file_of(i)
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    where = f"file {f}" if f else f"{self._name}:{self._split}"
    fix = (f"delete {os.path.dirname(f)} and rerun to prepare it again" if f else
           f"delete the prepared {self._name} in the TFDS data dir and rerun to prepare it again")
    return (f"cannot read record {i} of {self._name}:{self._split} ({type(e).__name__}: {cause}) "
            f"in {where}: the prepared dataset is damaged; {fix}")


def generated_source(data_cfg, split: str) -> Sequence:
  """`data.source='generate'`: a `shapes/<variant>` split read straight from the NumPy generator,
  the same examples the TFDS builder writes (in another record order), with no TensorFlow and
  nothing prepared: for machines without TF, such as GPU images. Each read renders its scene,
  which costs CPU time that reading the prepared files does not."""
  base, _, variant = data_cfg.tfds_name.partition(":")[0].partition("/")
  if base != "shapes":
    raise ValueError(f"data.source='generate' reads only the shapes datasets, not {data_cfg.tfds_name!r}; "
                     "use data.source='tfds'")
  workers = data_cfg.get("generate_workers", 0)
  if workers:
    return _held_split(variant or "default", split, workers)
  return scenes.Split(variant or "default", split)


@functools.lru_cache(maxsize=4)
def _held_split(variant: str, split: str, workers: int):
  """A rendered split, kept for the process (the cache, training and eval read the same one)."""
  return scenes.Split(variant, split).hold(workers)


def data_source(data_cfg, split: str) -> Sequence:
  """Random-access records of a split (prepared on first use); read errors are `DataFault`s."""
  if data_cfg.get("source", "tfds") == "generate":
    return generated_source(data_cfg, split)
  ensure_prepared(data_cfg)
  tfds = _tfds()
  try:
    src = tfds.data_source(data_cfg.tfds_name, split=split, data_dir=data_cfg.data_dir or None)
  except (RuntimeError, OSError) as e:  # A damaged or missing record file fails here (Riegeli).
    where = tfds.builder(data_cfg.tfds_name, data_dir=data_cfg.data_dir or None).data_dir
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DataFault(f"cannot open {data_cfg.tfds_name}:{split} in {where} ({type(e).__name__}: "
                    f"{cause}): the prepared dataset is damaged; delete {where} and rerun to "
                    "prepare it again") from e
  return CheckedSource(src, data_cfg.tfds_name, split)


def _get(ex: dict, path: str):
  for k in path.split("/"):
    ex = ex[k]
  return ex


def _as_str(t) -> str:
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def resize_crop(img: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Resize the shorter side to `size`, then crop (random with `rng`, else centre)."""
  h, w = img.shape[:2]
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  if (h, w) == (size, size):
    return img
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
  if rng is None:
    top, left = (nh - size) // 2, (nw - size) // 2
  else:
    top, left = int(rng.integers(nh - size + 1)), int(rng.integers(nw - size + 1))
  return img[top:top + size, left:left + size]


def ids_key(field: str, tok: Tokenizer | None = None) -> str:
  """Batch key of text `field` ('text', 'hn_true', ...) in the ids of `tok` (None: the stage's own).

  A stage's own model reads `text`; a teacher with a tokenizer of its own reads `text@<tok.name>`.
  """
  return field if tok is None else f"{field}@{tok.name}"


class TrainPreprocess:
  """Random caption choice, tokenization and crop for one training example.

  Besides `image` and `text` it emits `index` (the example's record index) and
  `cap` (which caption was picked), which key the teacher-output cache, and, if
  the dataset has them and `data.hard_negatives` is set, the tokenized
  relation / attribute twins of the example with validity flags. Every text is
  tokenized once per tokenizer: by `tokenizer` into `text` (the stage's own model),
  and by each of `extra` (the teachers') into `ids_key(field, tok)`.
  """

  def __init__(self, data_cfg, tokenizer: Tokenizer, extra: tuple[Tokenizer, ...] = ()):
    ad = adapter(data_cfg.tfds_name)
    self.captions_key = ad.captions_key
    self.twins = ad.hard_negatives and data_cfg.get("hard_negatives", False)
    self.size = data_cfg.image_size
    self.augment = data_cfg.augment
    self.tok = tokenizer
    self.extra = tuple({t.name: t for t in extra}.values())

  def _tokenize(self, field: str, text, out: dict) -> None:
    out[field] = self.tok.encode(text)
    for t in self.extra:
      out[ids_key(field, t)] = out[field] if t.name == self.tok.name else t.encode(text)

  def __call__(self, item: tuple[int, dict], rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, ex = item
    caps = list(_get(ex, self.captions_key))
    if not caps:
      raise ValueError(f"training example {index} has no captions")
    # Only the first 5 captions are cacheable (COCO has a few images with 6-7).
    cap = int(rng.integers(min(len(caps), NUM_EVAL_CAPTIONS)))
    image = resize_crop(ex["image"], self.size, rng if self.augment else None)
    out = {"image": image.astype(np.uint8), "index": np.int32(index), "cap": np.int32(cap)}
    self._tokenize("text", caps[cap], out)
    if self.twins:
      for k in ("true", "relation", "attribute"):
        s = _as_str(ex[f"hn_{k}"])
        self._tokenize(f"hn_{k}", s, out)
        out[f"hn_{k}_valid"] = np.bool_(bool(s))
      out["num_objects"] = np.int32(ex["num_objects"])
      if "hn_cells" in ex:  # The named objects' grid cells, for a grounding loss.
        out["hn_cells"] = np.asarray(ex["hn_cells"], np.int32)
    return out


def train_dataset(data_cfg, tokenizer: Tokenizer, global_batch: int, seed: int,
                  process: tuple[int, int] | None = None, extra: tuple[Tokenizer, ...] = ()):
  """grain IterDataset of this process's share of each global training batch.

  Args:
    process: (index, count); defaults to this JAX process.
    extra: more tokenizers whose ids the batches carry (see `TrainPreprocess`).
  """
  import grain
  import jax

  p, n_proc = process or (jax.process_index(), jax.process_count())
  if global_batch % n_proc:
    raise ValueError(f"batch size {global_batch} does not split over {n_proc} processes")
  src = data_source(data_cfg, data_cfg.train_split)
  n = len(src)
  # grain passes epoch-offset indices through shuffle/repeat; the record index is i mod n.
  ds = grain.MapDataset.source(src).map_with_index(lambda i, ex: (i % n, ex))
  ds = ds.seed(seed).shuffle().repeat()
  # Random choices are seeded by the global stream index, so they are the same
  # whichever process reads an element: map first, then stride.
  ds = ds.random_map(TrainPreprocess(data_cfg, tokenizer, extra))
  ds = ds[p::n_proc]
  ds = ds.batch(global_batch // n_proc, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                              prefetch_buffer_size=data_cfg.prefetch))


def train_iterator(data_cfg, tokenizer, global_batch, seed, state: dict | None = None,
                   process: tuple[int, int] | None = None, extra: tuple[Tokenizer, ...] = ()) -> Iterator:
  """A checkpointable iterator (`get_state()`/`set_state()`) of local batches."""
  it = iter(train_dataset(data_cfg, tokenizer, global_batch, seed, process, extra))
  if state is not None:
    it.set_state(state)
  return it


@dataclasses.dataclass
class EvalSet:
  """A whole test split in memory, COCO-5K style.

  Attributes:
    images: [N, S, S, 3] uint8.
    texts: [N * 5, L] int32; caption j belongs to image j // 5.
    hard: {"true": ids, "relation": ids, "attribute": ids, "*_valid": bool} or None.
  """

  images: np.ndarray
  texts: np.ndarray
  hard: dict[str, np.ndarray] | None = None

  @property
  def num_images(self) -> int:
    return len(self.images)


def eval_set(data_cfg, tokenizer: Tokenizer, split: str | None = None,
             limit: int | None = None) -> EvalSet:
  """Loads a split for retrieval eval: every image with its first 5 captions."""
  split = split or data_cfg.test_split
  src = data_source(data_cfg, split)
  ad = adapter(data_cfg.tfds_name)
  n = len(src) if limit is None else min(limit, len(src))
  images, texts = [], []
  hn: dict[str, list[Any]] = {"true": [], "relation": [], "attribute": []}
  for i in range(n):
    ex = src[i]
    caps = [_as_str(c) for c in _get(ex, ad.captions_key)]
    if len(caps) < NUM_EVAL_CAPTIONS:
      raise ValueError(f"{data_cfg.tfds_name}:{split} example {i} has {len(caps)} captions; "
                       f"retrieval eval needs {NUM_EVAL_CAPTIONS}")
    images.append(resize_crop(ex["image"], data_cfg.image_size, None))
    texts.extend(caps[:NUM_EVAL_CAPTIONS])
    if ad.hard_negatives:
      for k in hn:
        hn[k].append(_as_str(ex[f"hn_{k}"]))
  hard = None
  if ad.hard_negatives:
    hard = {k: tokenizer.encode_batch(v) for k, v in hn.items()}
    hard.update({f"{k}_valid": np.array([bool(s) for s in v]) for k, v in hn.items()})
    held = scenes.heldout_of(data_cfg.tfds_name)
    if held is not None:  # Which canonical captions state a composition train never showed.
      flags = np.array([held.canonical(s) for s in hn["true"]], bool).reshape(-1, 2)
      hard["heldout_colour"], hard["heldout_relation"] = flags[:, 0], flags[:, 1]
  return EvalSet(np.stack(images).astype(np.uint8), tokenizer.encode_batch(texts), hard)
