"""TFDS builder for `shapes`, the procedural captioned-scene dataset.

Imports TensorFlow Datasets, so it is only imported by the data pipeline when a
`shapes` dataset is requested; `mcad_jax` itself stays TF-free.

The named builder configs fix every generator knob and split size, so
`shapes/<config>` is the same dataset on every machine. Written as ArrayRecord,
which `tfds.data_source` (and so grain) reads with random access.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mcad_jax.data import scenes


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """A named, frozen choice of generator knobs and split sizes."""

  spec: scenes.SceneSpec = dataclasses.field(default_factory=scenes.SceneSpec)
  seed: int = 0
  num_train: int = 50_000
  num_validation: int = 1_000
  num_test: int = 1_000


BUILDER_CONFIGS = [
    ShapesConfig(name=name, description=v.description, spec=v.spec, seed=v.seed,
                 **{f"num_{split}": n for split, n in v.sizes})
    for name, v in scenes.VARIANTS.items()]


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes of coloured shapes with 5 captions each."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "num_objects and hn_cells (the twins' objects' grid cells).",
                   "1.2.0": "default: a 5k validation split (was 1k), the size of test, for "
                            "selecting settings; train and test unchanged. heldout: default's "
                            "scenes with compositions held out of train."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.spec.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=5),
            # Hard negatives (empty when the scene has < 2 objects).
            "hn_true": tfds.features.Text(),
            "hn_relation": tfds.features.Text(),
            "hn_attribute": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            # Grid cells (row * grid + col) of the two objects hn_true names; -1 if absent.
            "hn_cells": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }),
        supervised_keys=None,
        description="Synthetic captioned scenes; see mcad_jax/data/scenes.py.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    cfg.spec.validate()
    for i in range(n):
      yield i, scenes.example(cfg.spec, cfg.seed, split, i, scenes.VARIANTS[cfg.name].heldout)
