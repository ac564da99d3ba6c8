"""TFDS builder for Flickr30K with Karpathy's splits, from files you already have.

Flickr30K cannot be downloaded by a script (its images are behind a request
form), so this is a manual-download builder. Put in one directory (the TFDS
`manual_dir`, config `data.manual_dir`):

  dataset_flickr30k.json     Karpathy's split file: {"images": [{"filename",
                             "split": train|val|test|restval, "sentences": [{"raw"}...]}...]}
  flickr30k-images/          the JPEGs named by "filename"

Splits: train (29k), validation (1,014), test (1k), as the retrieval papers
report; `restval` images, if any, are added to train. Each example keeps all of
its captions (5 in Flickr30K). Written as ArrayRecord, like every dataset here.

A listed image that is missing stops preparation (the folder is incomplete).
An image that cannot be decoded, an empty caption, or an image left with no
caption is skipped and counted, and the counts are logged per split; more than
`MAX_SKIPPED` (or 5% of a split's images) skipped stops preparation, since that
is a wrong or damaged folder rather than a few bad files.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow_datasets as tfds
from PIL import Image

from mcad_jax.data.pipeline import DataFault

log = logging.getLogger(__name__)

MAX_SKIPPED = 10

SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}
JSON_NAME = "dataset_flickr30k.json"
IMAGE_DIR = "flickr30k-images"


class Flickr30k(tfds.core.GeneratorBasedBuilder):
  """Flickr30K images with their captions, Karpathy split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_FILES = (JSON_NAME, f"{IMAGE_DIR}/")  # What `pipeline.unpreparable` checks for.
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place {JSON_NAME} (Karpathy's split file) and the {IMAGE_DIR}/ folder of JPEGs in the "
      "manual dir (config: data.manual_dir).")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }),
        supervised_keys=None,
        description="Flickr30K, Karpathy split (train+restval / val / test).",
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    path = os.path.join(root, JSON_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    try:
      with open(path) as f:
        meta = json.load(f)
    except ValueError as e:
      raise DataFault(f"{path} is not valid JSON ({e}); is it Karpathy's {JSON_NAME}?") from e
    images = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(images, list):
      raise DataFault(f"{path}: no 'images' list; is it Karpathy's {JSON_NAME}?")
    return {name: self._generate_examples(root, [im for im in images if im.get("split") in keep],
                                          name)
            for name, keep in SPLITS.items()}

  def _generate_examples(self, root: str, images: list[dict], split: str):
    bad_images, empty_caps, no_caps = [], 0, []
    for im in images:
      fname = im["filename"]
      path = os.path.join(root, IMAGE_DIR, fname)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} listed in {JSON_NAME} is missing")
      raw = [s.get("raw", "").strip() for s in im.get("sentences", [])]
      caps = [c for c in raw if c]
      empty_caps += len(raw) - len(caps)
      if not caps:
        no_caps.append(fname)
        continue
      try:
        with Image.open(path) as img:
          img.load()  # A full decode: a truncated or corrupt JPEG fails here, not at training.
      except (OSError, SyntaxError, ValueError) as e:
        bad_images.append(f"{fname} ({e})")
        continue
      yield fname, {"image": path, "image/filename": fname, "captions": caps}
    skipped = len(bad_images) + len(no_caps)
    if skipped or empty_caps:
      log.warning("flickr30k (%s): skipped %d of %d images (%d unreadable: %s; %d with no caption: "
                  "%s) and %d empty captions", split, skipped, len(images), len(bad_images),
                  bad_images[:3], len(no_caps), no_caps[:3], empty_caps)
    if skipped > max(MAX_SKIPPED, 0.05 * len(images)):
      raise DataFault(f"{skipped} of {len(images)} images of the {split} split in {root} are "
                       f"unreadable or have no caption (e.g. {(bad_images + no_caps)[:3]}); "
                       "check the folder, then delete the prepared flickr30k and rerun")
