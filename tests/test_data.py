"""Scene generator and input pipeline (tokenizers: test_tokenizer.py)."""

import numpy as np
import pytest

from mcad_jax.data import scenes, tokenizer as tokenizers


def test_scenes_are_deterministic_and_split_dependent():
  spec = scenes.SceneSpec()
  a, b = scenes.example(spec, 0, "train", 7), scenes.example(spec, 0, "train", 7)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["captions"] == b["captions"]
  c = scenes.example(spec, 0, "test", 7)
  assert not np.array_equal(a["image"], c["image"])


def test_scene_captions_and_hard_negatives():
  spec = scenes.SceneSpec(max_objects=3, min_objects=2)
  rng = np.random.default_rng(0)
  for i in range(50):
    ex = scenes.example(spec, 1, "test", i)
    assert len(ex["captions"]) == 5 and all(ex["captions"])
    true, rel, attr = ex["hn_true"], ex["hn_relation"], ex["hn_attribute"]
    assert true and rel and true != rel
    # The twin names the same objects, in swapped order around the same relation word.
    assert sorted(true.split()) == sorted(rel.split())
    if attr:
      assert attr != true
  objs = scenes.sample_objects(spec, rng)
  assert len({(o.row, o.col) for o in objs}) == len(objs)


def test_relation_words():
  a = scenes.Obj("circle", "red", "small", 0, 0)
  b = scenes.Obj("square", "blue", "large", 0, 2)
  c = scenes.Obj("square", "blue", "large", 2, 0)
  assert scenes.relation(a, b) == "left of" and scenes.relation(b, a) == "right of"
  assert scenes.relation(a, c) == "above" and scenes.relation(c, a) == "below"


def test_spec_validation():
  with pytest.raises(ValueError, match="multiple of grid"):
    scenes.SceneSpec(image_size=50, grid=3).validate()
  with pytest.raises(ValueError, match="num_colors"):
    scenes.SceneSpec(num_colors=99).validate()


def test_train_pipeline_is_deterministic_and_resumable(tiny_data):
  from mcad_jax.data import pipeline

  tok = tokenizers.make("wordpiece", tiny_data.text_len)
  it = pipeline.train_iterator(tiny_data, tok, 16, seed=3)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  fourth = next(it)
  assert first[0]["image"].shape == (16, 32, 32, 3) and first[0]["image"].dtype == np.uint8
  assert first[0]["text"].shape == (16, 16) and (first[0]["text"][:, 0] == tok.cls_id).all()
  again = pipeline.train_iterator(tiny_data, tok, 16, seed=3)
  np.testing.assert_array_equal(next(again)["image"], first[0]["image"])
  resumed = pipeline.train_iterator(tiny_data, tok, 16, seed=3, state=state)
  b = next(resumed)
  np.testing.assert_array_equal(b["image"], fourth["image"])
  np.testing.assert_array_equal(b["text"], fourth["text"])
  other = pipeline.train_iterator(tiny_data, tok, 16, seed=4)
  assert not np.array_equal(next(other)["image"], first[0]["image"])


def test_eval_set(tiny_data):
  from mcad_jax.data import pipeline

  tok = tokenizers.make("wordpiece", tiny_data.text_len)
  ev = pipeline.eval_set(tiny_data, tok)
  assert ev.images.shape == (200, 32, 32, 3)
  assert ev.texts.shape == (1000, 16)
  assert set(ev.hard) >= {"true", "relation", "attribute", "true_valid"}
  assert ev.hard["true_valid"].sum() > 50


def test_resize_crop():
  from mcad_jax.data.pipeline import resize_crop

  img = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
  assert resize_crop(img, 16, None).shape == (16, 16, 3)
  assert resize_crop(img, 16, np.random.default_rng(0)).shape == (16, 16, 3)
  assert resize_crop(img[..., 0], 16, None).shape == (16, 16, 3)


def test_processes_split_each_global_batch(tiny_data):
  """Two processes' local batches hold exactly the rows of the 1-process global batch."""
  from mcad_jax.data import pipeline

  tok = tokenizers.make("wordpiece", tiny_data.text_len)
  whole = pipeline.train_iterator(tiny_data, tok, 8, seed=5, process=(0, 1))
  parts = [pipeline.train_iterator(tiny_data, tok, 8, seed=5, process=(i, 2)) for i in range(2)]
  for _ in range(3):
    g = next(whole)
    local = [next(it) for it in parts]
    assert local[0]["text"].shape[0] == 4
    key = lambda b: sorted(zip(b["text"].tolist(), b["image"].reshape(len(b["image"]), -1).sum(1),
                               strict=True))
    assert key(g) == sorted(key(local[0]) + key(local[1]))


def test_record_index_stays_in_range_across_epochs(tiny_data):
  """The cache is keyed by record index: past the first epoch it must still be < N."""
  from mcad_jax.data import pipeline

  n = len(pipeline.data_source(tiny_data, "train"))
  it = pipeline.train_iterator(tiny_data, tokenizers.make("wordpiece", tiny_data.text_len), 256, seed=0)
  seen = np.concatenate([next(it)["index"] for _ in range(2 * n // 256 + 1)])
  assert seen.max() < n and seen.min() >= 0
  assert len(np.unique(seen[:n - n % 256])) == n - n % 256  # An epoch visits each record once.


def test_generated_source_is_the_prepared_dataset(tiny_data):
  """data.source='generate' (no TF) reads the very examples the TFDS builder wrote (TFDS shuffles
  their record order when it prepares them, so the order differs), so a GPU run without
  TensorFlow trains and evaluates on the same data."""
  from mcad_jax.data import pipeline

  gen_cfg = tiny_data.copy_and_resolve_references()
  gen_cfg.source = "generate"

  def by_image(src):
    out = {}
    for i in range(len(src)):
      ex = src[i]
      texts = [pipeline._as_str(c) for c in ex["captions"]]
      texts += [pipeline._as_str(ex[f"hn_{k}"]) for k in ("true", "relation", "attribute")]
      out[ex["image"].tobytes()] = (texts, ex["hn_cells"].tolist(), int(ex["num_objects"]))
    return out

  tf_test, gen_test = by_image(pipeline.data_source(tiny_data, "test")), by_image(
      pipeline.data_source(gen_cfg, "test"))
  assert len(gen_test) == 200 and tf_test == gen_test
  assert len(pipeline.data_source(gen_cfg, "train")) == len(pipeline.data_source(tiny_data, "train"))
  tok = tokenizers.make("wordpiece", tiny_data.text_len)
  x = next(pipeline.train_iterator(gen_cfg, tok, 16, seed=3))
  y = next(pipeline.train_iterator(gen_cfg, tok, 16, seed=3))
  ref = next(pipeline.train_iterator(tiny_data, tok, 16, seed=3))
  assert set(x) == set(ref)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert x[k].shape == ref[k].shape and x[k].dtype == ref[k].dtype, k
  src = pipeline.data_source(gen_cfg, "test")
  held = scenes.Split("tiny", "test").hold(2)
  for i in (0, 199):
    np.testing.assert_array_equal(held[i]["image"], src[i]["image"])
    assert held[i]["captions"] == src[i]["captions"]
  with pytest.raises(IndexError):
    src[len(src)]
  coco = gen_cfg.copy_and_resolve_references()
  coco.tfds_name = "coco_captions"
  with pytest.raises(ValueError, match="only the shapes"):
    pipeline.data_source(coco, "train")


def test_validation_split_is_the_size_of_test_and_shares_no_scene_with_it():
  """Settings are selected on val: it must be as large as test and drawn apart from it."""
  import hashlib

  sizes = dict(scenes.VARIANTS["default"].sizes)
  assert sizes["validation"] == sizes["test"] == 5_000
  val, test = scenes.Split("default", "validation"), scenes.Split("default", "test")
  digest = lambda ex: hashlib.sha256(ex["image"].tobytes()).hexdigest()
  seen = {digest(test[i]) for i in range(300)}
  assert not seen & {digest(val[i]) for i in range(300)}
  # Its own generator stream: the same index gives another scene.
  assert val[0]["captions"] != test[0]["captions"]


def test_heldout_train_split_never_shows_a_heldout_composition():
  """SQOOP-style split: no train scene shows a held-out colour-shape pair or spatial fact; val
  and test do (so hard-negative accuracy on them measures composition, not recall)."""
  v = scenes.VARIANTS["heldout"]
  held = v.heldout
  objs = lambda split, i, h: scenes.scene_objects(v.spec, v.seed, split, i, h)[0]
  assert not any(held.scene(objs("train", i, held)) for i in range(20_000))
  # Unfiltered, the same stream shows them often: the check above can fail.
  assert sum(held.scene(objs("train", i, None)) for i in range(1_000)) > 100
  # The rendered examples agree, down to their canonical captions.
  train, test = scenes.Split("heldout", "train"), scenes.Split("heldout", "test")
  assert not any(any(held.canonical(train[i]["hn_true"])) for i in range(200))
  flags = np.array([held.canonical(test[i]["hn_true"]) for i in range(400)])
  assert flags[:, 0].sum() > 20 and flags[:, 1].sum() > 2
  # Val and test are drawn as in `default`.
  assert test[7]["captions"] == scenes.Split("default", "test")[7]["captions"]


def test_canonical_caption_flags_facts_and_their_converse():
  held = scenes.HeldOut(colour_shapes=(("red", "circle"),), triples=(("circle", "left of", "square"),))
  assert held.canonical("a small red circle above a large blue bar") == (True, False)
  assert held.canonical("a large blue circle left of a small red square") == (False, True)
  assert held.canonical("a large blue square right of a small green circle") == (False, True)
  assert held.canonical("a large blue square left of a small green circle") == (False, False)
  assert held.canonical("two shapes: a red circle and a blue square") == (False, False)


def test_generated_source_needs_no_tensorflow_before_training():
  """data.source='generate' is for images without TensorFlow (or TFDS): the checks the main job
  runs before any compute must not import them."""
  import pathlib
  import subprocess
  import sys

  code = ("import sys; from configs import shapes; from mcad_jax.data import pipeline; "
          "c = shapes.get_config('smoke').data; c.source = 'generate'; "
          "print(pipeline.unpreparable(c), any(m.startswith(('tensorflow', 'tensorflow_datasets')) "
          "for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1]).stdout
  assert out.split() == ["None", "False"], out
