"""configs/flickr30k.py's builder on a tiny fake Karpathy folder made here."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import flickr30k
from mcad_jax.data import pipeline, tokenizer as tokenizers

SPLITS = ["train"] * 4 + ["restval"] + ["val"] * 2 + ["test"] * 3


def make_karpathy(root, splits=SPLITS, drop_image=None):
  (root / "flickr30k-images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = []
  for i, split in enumerate(splits):
    name = f"{1000 + i}.jpg"
    if name != drop_image:
      Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(
          root / "flickr30k-images" / name)
    images.append({"filename": name, "split": split, "imgid": i,
                   "sentences": [{"raw": f"photo {i} caption {j} ."} for j in range(5)]})
  (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def data_config(tmp_path):
  data = flickr30k.get_config().data
  data.data_dir = str(tmp_path / "tfds")
  data.manual_dir = str(tmp_path / "karpathy")
  data.image_size = 32
  return data


def test_karpathy_splits_and_captions(tmp_path):
  make_karpathy(tmp_path / "karpathy")
  data = data_config(tmp_path)
  sizes = {s: len(pipeline.data_source(data, s)) for s in ("train", "validation", "test")}
  assert sizes == {"train": 5, "validation": 2, "test": 3}  # restval joins train
  test = pipeline.data_source(data, "test")
  assert all(len(test[i]["captions"]) == 5 for i in range(3))
  # The test split is exactly Karpathy's test images (7, 8, 9 here), decoded at full size.
  assert sorted(test[i]["image"].shape[0] for i in range(3)) == [47, 48, 49]
  tok = tokenizers.make("wordpiece", data.text_len)
  ev = pipeline.eval_set(data, tok)
  assert ev.images.shape == (3, 32, 32, 3) and ev.texts.shape == (15, data.text_len)
  assert sorted(tok.decode(t) for t in ev.texts[::5]) == [f"photo {i} caption 0." for i in (7, 8, 9)]
  b = next(pipeline.train_iterator(data, tok, 4, seed=0))
  assert b["image"].shape == (4, 32, 32, 3) and b["text"].shape == (4, data.text_len)


def test_missing_files_are_named(tmp_path):
  data = data_config(tmp_path)
  (tmp_path / "karpathy").mkdir()
  with pytest.raises(Exception, match="dataset_flickr30k.json"):
    pipeline.data_source(data, "test")
  tmp2 = tmp_path / "second"
  make_karpathy(tmp2 / "karpathy", drop_image="1008.jpg")
  with pytest.raises(Exception, match="1008.jpg"):
    pipeline.data_source(data_config(tmp2), "test")
