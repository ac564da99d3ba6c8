"""configs/coco.py through the real pipeline, on TFDS mock data (no download)."""

import numpy as np

from configs import coco
from mcad_jax.data import pipeline, tokenizer as tokenizers


def test_coco_pipeline_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds

  config = coco.get_config()
  data = config.data
  data.image_size = 32  # Mock images are tiny; the crop path is the same at 224.
  data.data_dir = str(tmp_path)
  tok = tokenizers.make("wordpiece", data.text_len)
  with tfds.testing.mock_data(num_examples=12):
    it = pipeline.train_iterator(data, tok, 8, seed=0)
    b = next(it)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["text"].shape == (8, 64) and (b["text"][:, 0] == tok.cls_id).all()
    ev = pipeline.eval_set(data, tok)
  assert ev.images.shape == (12, 32, 32, 3)
  assert ev.texts.shape == (60, 64)  # First 5 captions of each image, COCO-5K style.
  assert ev.hard is None
