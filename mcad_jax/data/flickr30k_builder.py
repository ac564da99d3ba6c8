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
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}
JSON_NAME = "dataset_flickr30k.json"
IMAGE_DIR = "flickr30k-images"


class Flickr30k(tfds.core.GeneratorBasedBuilder):
  """Flickr30K images with their captions, Karpathy split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
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
    with open(path) as f:
      meta = json.load(f)
    images = meta.get("images")
    if not isinstance(images, list):
      raise ValueError(f"{path}: no 'images' list; is it Karpathy's dataset_flickr30k.json?")
    return {name: self._generate_examples(root, [im for im in images if im.get("split") in keep])
            for name, keep in SPLITS.items()}

  def _generate_examples(self, root: str, images: list[dict]):
    for im in images:
      fname = im["filename"]
      path = os.path.join(root, IMAGE_DIR, fname)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} listed in {JSON_NAME} is missing")
      caps = [s["raw"].strip() for s in im.get("sentences", [])]
      if not caps:
        raise ValueError(f"{fname} has no sentences in {JSON_NAME}")
      yield fname, {"image": path, "image/filename": fname, "captions": caps}
