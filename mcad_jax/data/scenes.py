"""Procedural captioned scenes: the generator behind the `shapes` dataset.

Pure NumPy, no TensorFlow, so it can be imported and tested anywhere. The TFDS
builder in `shapes_builder.py` wraps it. Every example is a pure function of
(seed, split, index), so the dataset is bit-identical wherever it is prepared.

Difficulty knobs (see `SceneSpec`) set how much perception headroom there is:
resolution, the colour and shape lists (close colours are harder), object
counts, clutter, position jitter and pixel noise.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Well-separated colours first; the later ones are deliberately close to earlier
# ones (pink~red, brown~orange, teal~cyan...) so a bigger `num_colors` makes
# perception harder.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
    "pink": (240, 120, 170),
    "brown": (130, 80, 35),
    "gray": (128, 128, 128),
    "lime": (150, 230, 60),
    "navy": (20, 30, 110),
    "teal": (20, 130, 130),
    "magenta": (220, 40, 200),
    "olive": (120, 120, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = {"train": 0, "validation": 1, "test": 2}

_SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hoop"),
    "star": ("star",),
    "bar": ("bar", "stripe"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """Difficulty knobs of the generator.

  Attributes:
    image_size: square image side in pixels; a multiple of `grid`.
    grid: objects sit in distinct cells of a grid x grid layout.
    num_colors: how many of `COLORS` are used (in order).
    num_shapes: how many of `SHAPES` are used (in order).
    min_objects: fewest objects per image.
    max_objects: most objects per image (<= grid**2).
    jitter: max offset of an object from its cell centre, as a fraction of a cell.
    clutter: number of small grey distractor blobs (uniform 0..clutter).
    noise: std of the per-pixel Gaussian noise (0-255 scale).
    color_jitter: std of the per-object colour perturbation (0-255 scale).
  """

  image_size: int = 48
  grid: int = 3
  num_colors: int = 8
  num_shapes: int = 6
  min_objects: int = 1
  max_objects: int = 3
  jitter: float = 0.0
  clutter: int = 0
  noise: float = 8.0
  color_jitter: float = 0.0

  def validate(self) -> None:
    if self.image_size % self.grid:
      raise ValueError(f"image_size={self.image_size} must be a multiple of grid={self.grid}")
    if not 1 <= self.num_colors <= len(COLORS):
      raise ValueError(f"num_colors must be in [1, {len(COLORS)}], got {self.num_colors}")
    if not 1 <= self.num_shapes <= len(SHAPES):
      raise ValueError(f"num_shapes must be in [1, {len(SHAPES)}], got {self.num_shapes}")
    if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
      raise ValueError(
          f"need 1 <= min_objects <= max_objects <= grid**2, got "
          f"{self.min_objects}, {self.max_objects}, grid={self.grid}")


# The `shapes/default` dataset's knobs (the demo's data): shared by the TFDS builder and by code
# that regenerates test scenes without TFDS (mcad_jax/shipped.py).
def default_spec() -> SceneSpec:
  return SceneSpec(image_size=64, grid=4, num_colors=12, num_shapes=8, min_objects=1,
                   max_objects=4, jitter=0.15, clutter=3, noise=10.0, color_jitter=12.0)


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Compositions that a variant's train split never shows and its val and test splits do
  (SQOOP-style): colour-shape pairs, and spatial facts (shape, relation, shape).

  A fact and its converse are one arrangement ("circle left of square" is "square right of
  circle"), so holding out one holds out both.
  """

  colour_shapes: tuple[tuple[str, str], ...]
  triples: tuple[tuple[str, str, str], ...]

  def fact(self, shape_a: str, rel: str, shape_b: str) -> bool:
    return ((shape_a, rel, shape_b) in self.triples
            or (shape_b, _INVERSE[rel], shape_a) in self.triples)

  def scene(self, objs: list[Obj]) -> bool:
    """Whether a scene shows any held-out composition."""
    if any((o.color, o.shape) in self.colour_shapes for o in objs):
      return True
    return any(self.fact(a.shape, relation(a, b), b.shape)
               for a in objs for b in objs if a is not b)

  def canonical(self, caption: str) -> tuple[bool, bool]:
    """(names a held-out colour-shape pair, states a held-out fact) for a canonical two-object
    caption (`hard_negatives`' form: 'a small red circle left of a large blue square')."""
    m = _CANONICAL.match(caption)
    if not m:
      return False, False
    ca, sa, rel, cb, sb = m.groups()
    colour = (ca, sa) in self.colour_shapes or (cb, sb) in self.colour_shapes
    return colour, self.fact(sa, rel, sb)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named dataset: frozen generator knobs, seed and split sizes (`shapes/<name>`), and the
  compositions its train split holds out, if any."""

  spec: SceneSpec
  description: str
  seed: int = 0
  sizes: tuple[tuple[str, int], ...] = (("train", 50_000), ("validation", 1_000), ("test", 1_000))
  heldout: HeldOut | None = None


# The `heldout` variant's compositions: 8 of its 96 colour-shape pairs (each colour and shape
# once) and 8 spatial facts, two per relation.
HELDOUT = HeldOut(
    colour_shapes=(("red", "circle"), ("green", "square"), ("blue", "triangle"),
                   ("yellow", "diamond"), ("purple", "cross"), ("orange", "ring"),
                   ("white", "star"), ("cyan", "bar")),
    triples=(("circle", "left of", "square"), ("triangle", "above", "star"),
             ("diamond", "right of", "cross"), ("ring", "below", "bar"),
             ("star", "left of", "bar"), ("cross", "above", "circle"),
             ("square", "right of", "ring"), ("bar", "below", "triangle")))


# The named datasets. The TFDS builder (shapes_builder.py) writes these; `data.source='generate'`
# reads the same examples straight from the generator (no TensorFlow, nothing prepared).
VARIANTS = {
    # The demo's dataset. Harder perception than the first prototype's
    # (more, closer colours; more shapes; jitter and clutter), a 5k test set; docs/dataset.md.
    # Validation is the size of test (5k x 5 captions, twins included), from its own stream of
    # (seed, split, index): every setting is chosen there, and test is only reported.
    "default": Variant(default_spec(),
                       "64 px, 12 colours, 8 shapes, 1-4 objects, 60k train, 5k validation, 5k test.",
                       sizes=(("train", 60_000), ("validation", 5_000), ("test", 5_000))),
    # The first prototype's dataset, for reference (docs/dataset.md).
    "easy": Variant(SceneSpec(), "48 px, 8 colours, 6 shapes, 1-3 objects in a 3x3 grid, 50k train, "
                    "1k test."),
    # The demo's data with compositions held out of train (HELDOUT): does a student bind, or
    # recall pairs it saw? Val and test are drawn as in `default`.
    "heldout": Variant(default_spec(), "default's scenes; train never shows 8 colour-shape pairs "
                       "and 8 spatial facts that val and test do.",
                       sizes=(("train", 60_000), ("validation", 5_000), ("test", 5_000)),
                       heldout=HELDOUT),
    # Small and quick to prepare: smoke runs and tests.
    "tiny": Variant(SceneSpec(image_size=32, grid=2, num_colors=6, num_shapes=4, min_objects=1,
                              max_objects=3, noise=8.0),
                    "32 px, 6 colours, 4 shapes, 1-3 objects, 2k train, 200 test.",
                    sizes=(("train", 2_000), ("validation", 100), ("test", 200))),
}


def heldout_of(tfds_name: str) -> HeldOut | None:
  """The compositions dataset `tfds_name` holds out of train (None if not a shapes variant
  that holds any out)."""
  base, _, rest = tfds_name.partition("/")
  v = VARIANTS.get(rest.split(":")[0] or "default") if base == "shapes" else None
  return v.heldout if v is not None else None


def grid_cells(tfds_name: str) -> int:
  """Cells of the object grid of dataset `shapes/<variant>` (the cells `hn_cells` index)."""
  base, _, rest = tfds_name.partition("/")
  variant = rest.split(":")[0] or "default"
  if base != "shapes" or variant not in VARIANTS:
    raise ValueError(f"{tfds_name!r} is not a shapes dataset with a known grid; known: "
                     f"{['shapes/' + v for v in VARIANTS]}")
  return VARIANTS[variant].spec.grid ** 2


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  row: int
  col: int


def describe(o: Obj, rng: np.random.Generator | None = None, with_size: bool = True) -> str:
  """A noun phrase for one object; random synonyms when `rng` is given."""
  pick = (lambda xs: xs[int(rng.integers(len(xs)))]) if rng is not None else (lambda xs: xs[0])
  words = ["a"]
  if with_size:
    words.append(pick(_SIZE_WORDS[o.size]))
  words += [o.color, pick(_SHAPE_WORDS[o.shape])]
  if words[1][0] in "aeiou":
    words[0] = "an"
  return " ".join(words)


def relation(a: Obj, b: Obj) -> str:
  """Where `a` is relative to `b`; columns first, then rows."""
  if a.col != b.col:
    return "left of" if a.col < b.col else "right of"
  return "above" if a.row < b.row else "below"


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  ax, ay = np.abs(dx), np.abs(dy)
  d2 = dx * dx + dy * dy
  if shape == "circle":
    return d2 <= r * r
  if shape == "square":
    return (ax <= 0.8 * r) & (ay <= 0.8 * r)
  if shape == "triangle":
    return (dy <= 0.8 * r) & (dy >= -r) & (ax <= (dy + r) * 0.55)
  if shape == "diamond":
    return ax + ay <= r
  if shape == "cross":
    return ((ax <= 0.33 * r) & (ay <= r)) | ((ay <= 0.33 * r) & (ax <= r))
  if shape == "ring":
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
  if shape == "star":
    ang = np.arctan2(dy, dx)
    rad = r * (0.55 + 0.45 * np.cos(5 * ang))
    return d2 <= rad * rad
  if shape == "bar":
    return (ax <= r) & (ay <= 0.35 * r)
  raise ValueError(f"unknown shape {shape!r}")


def sample_objects(spec: SceneSpec, rng: np.random.Generator) -> list[Obj]:
  """Objects with distinct (shape, colour, size) and distinct cells."""
  colors = list(COLORS)[: spec.num_colors]
  shapes = SHAPES[: spec.num_shapes]
  n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
  cells = rng.permutation(spec.grid * spec.grid)[:n]
  objs, seen = [], set()
  for cell in cells:
    while True:
      key = (shapes[rng.integers(len(shapes))], colors[rng.integers(len(colors))],
             SIZES[rng.integers(len(SIZES))])
      if key not in seen:
        break
    seen.add(key)
    objs.append(Obj(key[0], key[1], key[2], int(cell) // spec.grid, int(cell) % spec.grid))
  return objs


def render(spec: SceneSpec, objs: list[Obj], rng: np.random.Generator) -> np.ndarray:
  """Draws objects on a noisy background; returns uint8 [H, W, 3]."""
  s, cell = spec.image_size, spec.image_size / spec.grid
  bg = rng.uniform(40, 90)
  img = np.full((s, s, 3), bg, np.float32)
  ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
  for _ in range(int(rng.integers(0, spec.clutter + 1))):
    cx, cy = rng.uniform(0, s, size=2)
    blob = (xs - cx) ** 2 + (ys - cy) ** 2 <= (0.12 * cell) ** 2
    img[blob] = rng.uniform(60, 200)
  for o in objs:
    jx, jy = rng.uniform(-spec.jitter, spec.jitter, size=2) * cell
    cx, cy = (o.col + 0.5) * cell + jx, (o.row + 0.5) * cell + jy
    r = (0.44 if o.size == "large" else 0.26) * cell
    m = _mask(o.shape, xs - cx, ys - cy, r)
    color = np.asarray(COLORS[o.color], np.float32) + rng.normal(0, spec.color_jitter, 3)
    img[m] = color
  img += rng.normal(0, spec.noise, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def captions(objs: list[Obj], rng: np.random.Generator, n: int = 5) -> list[str]:
  """`n` distinct-ish captions mixing lists, counts and spatial relations."""
  out = []
  for k in range(n):
    order = [objs[i] for i in rng.permutation(len(objs))]
    if len(objs) == 1 or k == 0:
      phrases = [describe(o, rng, with_size=rng.random() < 0.8) for o in order]
      body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
      lead = ["", "there is ", "a picture of ", "an image with "][int(rng.integers(4))]
      if len(objs) > 1 and rng.random() < 0.5:
        lead = f"{_COUNT_WORDS[len(objs)]} shapes: "
      out.append(lead + body)
    else:
      a, b = order[0], order[1]
      rel = relation(a, b)
      text = f"{describe(a, rng)} {rel} {describe(b, rng)}"
      if len(objs) > 2 and rng.random() < 0.5:
        text += f" and {describe(order[2], rng)}"
      out.append(text)
  return out


def hard_negatives(objs: list[Obj]) -> tuple[str, str, str]:
  """(true caption, relation twin, attribute twin); empty strings if undefined.

  The relation twin swaps which object is named first, keeping the relation
  word, so it states the opposite arrangement. The attribute twin swaps the two
  objects' colours. Only defined for scenes with two or more objects, using the
  first two, and the attribute twin only when their colours differ.
  """
  if len(objs) < 2:
    return "", "", ""
  a, b = objs[0], objs[1]
  rel = relation(a, b)
  true = f"{describe(a)} {rel} {describe(b)}"
  rel_twin = f"{describe(b)} {rel} {describe(a)}"
  attr_twin = ""
  if a.color != b.color:
    a2, b2 = dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)
    attr_twin = f"{describe(a2)} {rel} {describe(b2)}"
  return true, rel_twin, attr_twin


_WORD = r"(\w+)"
_CANONICAL = re.compile(rf"^an? (?:small|large) {_WORD} {_WORD} (left of|right of|above|below) "
                        rf"an? (?:small|large) {_WORD} {_WORD}$")


def scene_objects(spec: SceneSpec, seed: int, split: str, index: int,
                  heldout: HeldOut | None = None) -> tuple[list[Obj], np.random.Generator]:
  """The objects of example `index` of `split`, and the generator state that renders them.

  With `heldout`, a train scene that shows a held-out composition is drawn again (from the
  same stream), so train never shows one; val and test are not filtered.
  """
  rng = np.random.default_rng([seed, SPLITS[split], index])
  objs = sample_objects(spec, rng)
  while heldout is not None and split == "train" and heldout.scene(objs):
    objs = sample_objects(spec, rng)
  return objs, rng


def example(spec: SceneSpec, seed: int, split: str, index: int,
            heldout: HeldOut | None = None) -> dict:
  """The `index`-th example of `split`: image, 5 captions and hard-negative twins.

  Also `num_objects` (for curricula over scene complexity) and `hn_cells`, the grid
  cells (row * grid + col) of the two objects the hard-negative captions name (-1 if
  there are fewer), for grounding losses.
  """
  objs, rng = scene_objects(spec, seed, split, index, heldout)
  img = render(spec, objs, rng)
  caps = captions(objs, rng)
  true, rel_twin, attr_twin = hard_negatives(objs)
  cells = [o.row * spec.grid + o.col for o in objs[:2]] + [-1] * (2 - min(2, len(objs)))
  return {"image": img, "captions": caps, "hn_true": true,
          "hn_relation": rel_twin, "hn_attribute": attr_twin,
          "num_objects": np.int32(len(objs)), "hn_cells": np.asarray(cells, np.int32)}


class Split:
  """Random access to one split of a named variant, generated on read (a data source for grain).

  Example i is `example(spec, seed, split, i)`. The TFDS builder writes the same examples, in
  another record order (TFDS shuffles records by key when it prepares them), with texts as
  `bytes` where these are `str`.
  """

  def __init__(self, variant: str, split: str):
    if variant not in VARIANTS:
      raise ValueError(f"no shapes variant {variant!r}; known: {sorted(VARIANTS)}")
    self.variant = VARIANTS[variant]
    sizes = dict(self.variant.sizes)
    if split not in sizes:
      raise ValueError(f"shapes/{variant} has no split {split!r}; it has {sorted(sizes)}")
    self.split, self._n = split, sizes[split]
    self.variant.spec.validate()
    self._held: list[dict] | None = None

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i) -> dict:
    i = int(i)
    if not 0 <= i < self._n:
      raise IndexError(f"example {i} of a {self._n}-example split")
    return self._held[i] if self._held is not None else self._render(i)

  def hold(self, processes: int) -> Split:
    """Renders the whole split once, over `processes` worker processes, and serves reads from
    memory (60k 64 px scenes: ~0.8 GB): on a GPU host the input threads then only tokenize."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
      self._held = pool.map(self._render, range(self._n), chunksize=256)
    return self

  def _render(self, i: int) -> dict:
    return example(self.variant.spec, self.variant.seed, self.split, i, self.variant.heldout)
