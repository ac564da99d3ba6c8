"""Text-to-image search the way the phone does it: TFLite text encoder + flat index, brute force.

  python -m export.search --workdir W "a red circle left of a blue square"
  python -m export.search --workdir W -k 8 --png hits.png "two green triangles"

Needs only ai-edge-litert and the tokenizer vocab (no TensorFlow, no JAX), except
`--png`, which reads the gallery images back from the TFDS test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from export import index as index_lib, runtime
from mcad_jax import fileio


class Searcher:
  """A workdir's exported text encoder and gallery index, ready for queries."""

  def __init__(self, workdir: str, fmt: str = "int8", index_dtype: str = "int8", num_threads: int = 1,
               memory: str = "resident"):
    from mcad_jax.data import tokenizer as tokenizers

    out = os.path.join(workdir, "export")
    meta_path = os.path.join(out, "meta.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{meta_path} not found: run the export stage first "
                              f"(python -m export --workdir {workdir})")
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.tokenizer = tokenizers.make(self.meta.get("tokenizer", "wordpiece"), self.meta["text_len"])
    self.encoder = runtime.TFLiteEncoder(os.path.join(out, f"student_text_{fmt}.tflite"), num_threads)
    self.index = index_lib.open_for_search(os.path.join(out, f"gallery_{index_dtype}.idx"), memory)
    if len(self.index) != self.meta["gallery_size"]:
      raise index_lib.IndexFileError(f"index has {len(self.index)} rows, meta.json says "
                                     f"{self.meta['gallery_size']}: re-run the export")
    # An int8 search is re-ranked by the fp16 file when the export wrote one, read lazily:
    # only the candidates' rows are read.
    fp16 = os.path.join(out, "gallery_fp16.idx")
    self.rerank = (index_lib.Index.load(fp16, verify=False, lazy=True)
                   if index_dtype == "int8" and os.path.isfile(fp16) else None)

  def query(self, text: str, k: int = 5) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(image ids [k], scores [k], timings in ms) for one query."""
    t0 = time.perf_counter()
    ids = self.tokenizer.encode_batch([text])
    t1 = time.perf_counter()
    z = self.encoder(ids)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    t2 = time.perf_counter()
    idx, scores = self.index.search(z, k, rerank=self.rerank)
    t3 = time.perf_counter()
    return idx[0], scores[0], {"tokenize": 1e3 * (t1 - t0), "encode": 1e3 * (t2 - t1),
                               "search": 1e3 * (t3 - t2)}


def write_grid(meta: dict, ids, scores, query: str, path: str, thumb: int = 128) -> None:
  """A PNG row of the hits, read back from the gallery's TFDS split."""
  import tensorflow_datasets as tfds
  from PIL import Image, ImageDraw

  src = tfds.data_source(meta["tfds_name"], split=meta["split"], data_dir=meta["data_dir"] or None)
  pad, head = 4, 20
  grid = Image.new("RGB", (len(ids) * (thumb + pad) + pad, thumb + 2 * head + pad), "white")
  draw = ImageDraw.Draw(grid)
  draw.text((pad, 2), query[:120], fill="black")
  for j, (i, s) in enumerate(zip(ids, scores, strict=True)):
    img = Image.fromarray(np.asarray(src[int(i)]["image"])).resize((thumb, thumb), Image.NEAREST)
    x = pad + j * (thumb + pad)
    grid.paste(img, (x, head))
    draw.text((x, head + thumb + 2), f"#{int(i)} {s:.3f}", fill="black")
  with fileio.atomic_path(path) as tmp:
    grid.save(tmp, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m export.search", description=__doc__.splitlines()[0])
  ap.add_argument("query", nargs="+", help="the text query")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("-k", type=int, default=5)
  ap.add_argument("--format", default="int8", help="text encoder file: fp32, fp16, dynamic or int8")
  ap.add_argument("--index", default="int8", help="gallery index: int8 or fp16")
  ap.add_argument("--png", help="also write the hits as a PNG grid here")
  ap.add_argument("--memory", default="resident", choices=index_lib.MEMORY,
                  help="hold the gallery in memory (resident), or read it from disk at each query "
                       "(stream: bounded memory, slower queries)")
  args = ap.parse_args(argv)
  query = " ".join(args.query)
  try:
    s = Searcher(args.workdir, args.format, args.index, memory=args.memory)
  except (FileNotFoundError, runtime.ModelFileError, index_lib.IndexFileError) as e:
    print(f"search: {e}", file=sys.stderr)
    return 2
  ids, scores, ms = s.query(query, args.k)
  print(f"query: {query!r}  ({args.format} text encoder, {args.index} index of {len(s.index)} images;"
        f" encode {ms['encode']:.2f} ms, search {ms['search']:.2f} ms)")
  for rank, (i, sc) in enumerate(zip(ids, scores, strict=True), 1):
    print(f"{rank:3d}. image #{int(i):<6d} score {sc:.3f}  {s.meta['captions'][int(i)]}")
  if args.png:
    write_grid(s.meta, ids, scores, query, args.png)
    print(f"wrote {args.png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
