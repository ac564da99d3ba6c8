"""Flickr30K (Karpathy split) at paper scale: the COCO recipe on 29k training images.

  python -m mcad_jax.main --config=configs/flickr30k.py --workdir=W \
      --config.data.manual_dir=/path/to/flickr30k

`data.manual_dir` holds Karpathy's `dataset_flickr30k.json` and the
`flickr30k-images/` folder (mcad_jax/data/flickr30k_builder.py); the first run
prepares them into the TFDS data dir. Test: the 1k Karpathy test images with 5
captions each, as the papers report Flickr30K. Variant `teacher`: first stage only.
"""

from configs import coco
from mcad_jax import config_lib as cl


def get_config(arg: str = ""):
  if arg not in ("", "teacher"):
    raise ValueError(f"unknown flickr30k variant {arg!r}; use '' or 'teacher'")
  c = cl.base_config()
  c.data.tfds_name = "flickr30k"
  c.data.train_split = "train"
  c.data.test_split = "test"
  return coco.paper_scale(c, "flickr30k", 29_000, arg)
