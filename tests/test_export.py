"""Export: conversion and parity on a tiny model, int8, op rejection, the index and bad files."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from export import convert, index, runtime

IMG, LEN = 32, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random-init smoke-sized student, its SavedModel and some inputs (with padded captions)."""
  from configs import shapes
  from mcad_jax import stages

  config = shapes.get_config("smoke")
  # [CLS] text pooling: the old TF full-integer recipe (tested here for the bounded mask) cannot
  # carry the smoke student's positional-moment pooling (min cosine ~0.3; RESULTS.md, "What was
  # tried"). The moments student is exported with the default recipe in the smoke pipeline test.
  config.distill.model.text_kw.pool = "cls"
  model = stages.dual_model(config, config.distill.model)
  img, txt = stages.dummy_batch(config)
  params = model.init(jax.random.key(0), img, txt)["params"]
  fns = convert.encoder_fns(model, params)
  specs = convert.input_specs(IMG, LEN, 1)
  sm = str(tmp_path_factory.mktemp("sm") / "saved_model")
  convert.save_savedmodel(fns, specs, sm)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (48, IMG, IMG, 3)).astype(np.float32)
  lens = rng.integers(3, LEN + 1, 48)
  ids = rng.integers(1000, 30000, (48, LEN)).astype(np.int32)
  ids[np.arange(LEN)[None, :] >= lens[:, None]] = 0  # Real padding: the mask matters.
  ids[:, 0] = 101
  data = {"image": images, "text": ids}
  ref = {k: np.asarray(jax.jit(fns[k])(data[k])) for k in data}
  return fns, specs, sm, data, ref


def _rep(x):
  return lambda: ([x[i:i + 1]] for i in range(len(x)))


@pytest.mark.parametrize("enc", ["image", "text"])
def test_fp32_tflite_and_onnx_match_jax(tmp_path, tiny, enc):
  fns, specs, sm, data, ref = tiny
  buf = convert.to_tflite(sm, enc, "fp32")
  ops = runtime.tflite_ops(buf)
  assert ops and not runtime.non_builtin(ops)
  path = tmp_path / f"{enc}.tflite"
  path.write_bytes(buf)
  got = runtime.TFLiteEncoder(str(path))(data[enc])
  assert got.shape == ref[enc].shape
  np.testing.assert_allclose(got, ref[enc], atol=2e-5)
  onnx_path = convert.to_onnx(fns[enc], specs[enc], str(tmp_path / f"{enc}.onnx"), enc)
  np.testing.assert_allclose(runtime.OnnxEncoder(onnx_path)(data[enc]), ref[enc], atol=2e-5)


def test_savedmodel_signatures(tiny):
  import tensorflow as tf

  _, _, sm, data, ref = tiny
  loaded = tf.saved_model.load(sm)
  assert {"encode_image", "encode_image_uint8", "encode_text"} <= set(loaded.signatures)
  got = loaded.signatures["encode_image_uint8"](image=tf.constant(data["image"][:1].astype(np.uint8)))
  np.testing.assert_allclose(got["embedding"].numpy(), ref["image"][:1], atol=2e-5)
  got = loaded.signatures["encode_text"](ids=tf.constant(data["text"][:1]))
  np.testing.assert_allclose(got["embedding"].numpy(), ref["text"][:1], atol=2e-5)


def test_int8_text_with_bounded_mask(tmp_path, tiny):
  """Full-integer text encoder on padded captions: the bounded mask keeps it close to float."""
  from export.stage import parity

  _, _, sm, data, ref = tiny
  buf = convert.to_tflite(sm, "text", "int8", _rep(data["text"][:32]))
  ops = runtime.tflite_ops(buf)
  # Integer ids in, so no QUANTIZE since the mask became a select (export form); the float
  # embedding out still passes a DEQUANTIZE.
  assert {"QUANTIZE", "DEQUANTIZE"} & set(ops) and not runtime.non_builtin(ops)
  path = tmp_path / "text_int8.tflite"
  path.write_bytes(buf)
  p = parity(ref["text"], runtime.TFLiteEncoder(str(path))(data["text"]))
  assert p["cosine_mean"] >= 0.99, p
  assert len(buf) < 0.4 * len(convert.to_tflite(sm, "text", "fp32"))


def test_int8_io_takes_uint8_pixels_and_gives_int8(tmp_path, tiny):
  from export.stage import parity

  _, _, sm, data, ref = tiny
  buf = convert.to_tflite(sm, "image", "int8", _rep(data["image"][:32]), int8_io=True)
  path = tmp_path / "img_int8io.tflite"
  path.write_bytes(buf)
  e = runtime.TFLiteEncoder(str(path))
  assert e.input_dtype == np.uint8
  raw = e(data["image"], raw=True)
  assert raw.dtype == np.int8
  assert parity(ref["image"], e(data["image"]))["cosine_mean"] >= 0.98


def test_int8_recipe_names_match_the_config_check():
  from export import quantize
  from mcad_jax import config_lib

  assert config_lib.INT8_RECIPES == ("tf", *quantize.RECIPES)


@pytest.mark.parametrize("enc", ["image", "text"])
def test_quantizer_recipe_is_integer_and_close_on_every_example(tmp_path, tiny, enc):
  """The export's default int8 recipe (ai-edge-quantizer on the fp32 file): int8 weights, builtin
  ops only, smaller files, and no example far off."""
  from export import quantize
  from export.stage import parity
  from mcad_jax import config_lib

  _, _, sm, data, ref = tiny
  fp32 = convert.to_tflite(sm, enc, "fp32")
  buf = quantize.quantize(fp32, data[enc][:8], config_lib.export_stage_config().int8_recipe)
  assert not runtime.non_builtin(runtime.tflite_ops(buf))
  path = tmp_path / f"{enc}_q.tflite"
  path.write_bytes(buf)
  p = parity(ref[enc], runtime.TFLiteEncoder(str(path))(data[enc]))
  assert p["cosine_min"] >= 0.995, p
  # int8 weights: the text tower's embedding table dominates its file.
  assert len(buf) < (0.4 if enc == "text" else 0.9) * len(fp32)
  with pytest.raises(ValueError, match="unknown quantization recipe"):
    quantize.quantize(fp32, data[enc][:2], "a4w4")


def test_unsupported_op_fails_loudly(tmp_path):
  """A graph op with no TFLite builtin (a Cholesky here) must not convert, nor fall back to Flex."""
  def fn(x):
    a = x @ x.T + 4.0 * jnp.eye(x.shape[0])
    return jnp.linalg.cholesky(a)

  sm = convert.save_savedmodel({"image": fn}, {"image": ((4, 4), np.dtype(np.float32))},
                               str(tmp_path / "sm"))
  with pytest.raises(convert.ExportError, match="builtin ops only") as err:
    convert.to_tflite(sm, "image", "fp32")
  msg = str(err.value)
  assert "lapack" in msg and "XlaCallModule" in msg and len(msg) < 3000


def test_non_builtin_ops_are_named():
  assert runtime.non_builtin(["ADD", "CUSTOM:Foo", "FlexEinsum"]) == ["CUSTOM:Foo", "FlexEinsum"]


# ----------------------------------------------------------------------------- index


def _emb(n=500, d=32, seed=0):
  e = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_index_round_trip_and_search(tmp_path, dtype):
  e = _emb()
  ix = index.Index.build(e, dtype)
  path = str(tmp_path / "g.idx")
  ix.save(path)
  assert os.path.getsize(path) == index.HEADER_BYTES + e.size * (2 if dtype == "fp16" else 1)
  back = index.Index.load(path)
  np.testing.assert_array_equal(back.rows, ix.rows)
  assert back.scale == pytest.approx(ix.scale)
  q = e[:20] + 0.05 * _emb(20, seed=1)
  idx, scores = back.search(q, k=7)
  exact = q @ e.T
  want = np.argsort(-exact, axis=1)[:, :7]
  assert (idx[:, 0] == want[:, 0]).mean() >= 0.95
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # Best first.
  np.testing.assert_allclose(scores, np.take_along_axis(exact, idx, 1), atol=0.03)


def test_index_int8_rows_use_the_gallery_range_and_score_dequantized():
  e = _emb(50, 16)
  ix = index.Index.build(e, "int8")
  assert ix.scale == pytest.approx(np.abs(e).max() / 127)
  assert np.abs(ix.rows).max() == 127
  q = e[:3]
  want = q.astype(np.float64) @ (ix.rows.astype(np.float64) * ix.scale).T
  np.testing.assert_allclose(ix.scores(q), want, rtol=1e-5, atol=1e-6)


def test_int8_search_reranked_by_the_fp16_file_read_lazily(tmp_path):
  """Random unit vectors bunch their top scores: int8 alone swaps near-ties; the fp16 re-rank of
  its top 100 gives back the exact top 10, reading only those rows of the fp16 file."""
  e, q = _emb(100_000, 64), _emb(50, 64, seed=7)
  index.Index.build(e, "fp16").save(str(tmp_path / "g16.idx"))
  i8 = index.Index.build(e, "int8")
  f16 = index.Index.load(str(tmp_path / "g16.idx"), lazy=True)
  assert isinstance(f16.rows, index.RowFile)
  np.testing.assert_array_equal(f16.rows[np.array([[3, 99_999]])][0], e[[3, 99_999]].astype(np.float16))
  exact = np.argsort(-(q @ e.T), axis=1)[:, :10]
  recall = lambda idx: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact, strict=True)])
  plain = recall(i8.search(q, 10)[0])
  idx, scores = i8.search(q, 10, rerank=f16)
  assert plain < recall(idx) and recall(idx) >= 0.99, (plain, recall(idx))
  np.testing.assert_allclose(scores, np.take_along_axis(q @ e.T, idx, 1), atol=2e-3)
  assert np.all(np.diff(scores, axis=1) <= 0)
  with pytest.raises(ValueError, match="re-ranking index"):
    i8.search(q, 10, rerank=index.Index.build(e[:10], "fp16"))


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_index_faiss_and_numpy_paths_agree(tmp_path, dtype, monkeypatch):
  pytest.importorskip("faiss")
  monkeypatch.setattr(index, "BLOCK_BYTES", 24 * 100)  # Several blocks, the last one short.
  e = _emb(2050, 24)
  ix = index.Index.build(e, dtype)
  q = _emb(9, 24, seed=3)
  i_f, s_f = ix.search(q, 10)
  i_n, s_n = ix.search(q, 10, use_faiss=False)
  assert ix._faiss is not None and ix._faiss.ntotal == len(e)
  np.testing.assert_allclose(s_f, s_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(i_f, i_n)
  # A query process keeps the rows on disk; faiss's codes, filled block by block from the file,
  # are its one copy, and it answers the same.
  ix.save(str(tmp_path / "g.idx"))
  lazy = index.open_for_search(str(tmp_path / "g.idx"))
  assert isinstance(lazy.rows, index.RowFile)
  np.testing.assert_array_equal(lazy.rows[5:2049], ix.rows[5:2049])
  i_l, s_l = lazy.search(q, 10)
  np.testing.assert_array_equal(i_l, i_f)
  np.testing.assert_array_equal(s_l, s_f)
  # Streamed: the rows are read again at each search, one block at a time into one buffer, and
  # each block's top-k merged; faiss and numpy, with a re-rank on top, answer the same.
  streamed = index.open_for_search(str(tmp_path / "g.idx"), "stream")
  assert streamed.stream and isinstance(streamed.rows, index.RowFile)
  for use_faiss in (True, False):
    i_s, s_s = streamed.search(q, 10, use_faiss=use_faiss)
    np.testing.assert_array_equal(i_s, i_f)
    np.testing.assert_allclose(s_s, s_f, rtol=1e-4, atol=1e-5)
  # One block's rows (2400 bytes of them), not the gallery's.
  assert len(streamed._stream_buffer[1]) == 2400 // ix.rows[0].nbytes < len(e)
  np.testing.assert_array_equal(streamed.search(q, 5, rerank=lazy)[0], ix.search(q, 5, rerank=lazy)[0])
  with pytest.raises(ValueError, match="memory mode"):
    index.open_for_search(str(tmp_path / "g.idx"), "mmap")


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:20], "shorter than"),
    (lambda b: b[:-7], "truncated"),
    (lambda b: b[:50] + bytes([b[50] ^ 0xFF]) + b[51:], "data checksum"),
    (lambda b: b[:17] + bytes([b[17] ^ 0x01]) + b[18:], "header checksum"),
    (lambda b: b"NOTANIDX" + b[8:], "not an mcad index"),
])
@pytest.mark.parametrize("lazy", [False, True])
def test_damaged_index_is_refused(tmp_path, damage, match, lazy, monkeypatch):
  monkeypatch.setattr(index, "BLOCK_BYTES", 1000)  # The lazy check reads the rows in blocks.
  path = tmp_path / "g.idx"
  index.Index.build(_emb(), "int8").save(str(path))
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(index.IndexFileError, match=match):
    index.Index.load(str(path), lazy=lazy)


def test_damaged_model_file_is_refused(tmp_path, tiny):
  _, _, sm, _, _ = tiny
  buf = convert.to_tflite(sm, "image", "fp32")
  bad = {"truncated": buf[: len(buf) // 3], "garbage": os.urandom(4096), "empty": b""}
  for name, content in bad.items():
    p = tmp_path / f"{name}.tflite"
    p.write_bytes(content)
    with pytest.raises(runtime.ModelFileError):
      runtime.TFLiteEncoder(str(p))
  with pytest.raises(runtime.ModelFileError, match="no such model file"):
    runtime.TFLiteEncoder(str(tmp_path / "missing.tflite"))
  p = tmp_path / "bad.onnx"
  p.write_bytes(b"\x08\x07garbage")
  with pytest.raises(runtime.ModelFileError):
    runtime.OnnxEncoder(str(p))


def test_int8_r1_floor_is_points_on_large_sets_and_queries_on_small():
  from export.stage import _check_retrieval

  ecfg = ml_collections.ConfigDict({"quant_r1_drop_max": 0.5, "quant_r1_drop_queries": 1})
  rows = lambda drop: {"student_fp32": {"i2t_r1": 30.0, "t2i_r1": 20.0},
                       "student_int8": {"i2t_r1": 30.0 - drop, "t2i_r1": 20.0}}
  assert _check_retrieval(ecfg, rows(0.4), 5000, 25000) == []
  assert "i2t_r1" in _check_retrieval(ecfg, rows(0.6), 5000, 25000)[0]
  # 200 images: one query is 0.5 points; two queries (1.0) fail unless 2+ queries are allowed.
  assert _check_retrieval(ecfg, rows(1.0), 200, 1000)
  ecfg.quant_r1_drop_queries = 4
  assert _check_retrieval(ecfg, rows(1.0), 200, 1000) == []
  assert _check_retrieval(ecfg, rows(2.5), 200, 1000)


# ----------------------------------------------------------------------------- NPU (static int8)


def test_export_form_is_the_same_function_in_float():
  """The forms traced for export (moments pool as a weights matmul, mask as a select, two-pass
  LayerNorm) change float outputs by rounding only."""
  from configs import shapes
  from mcad_jax import stages
  from mcad_jax.models import layers

  config = shapes.get_config("smoke")  # Moments pooling in both towers.
  model = stages.dual_model(config, config.distill.model)
  img, txt = stages.dummy_batch(config)
  params = model.init(jax.random.key(1), img, txt)["params"]
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, IMG, IMG, 3)).astype(np.float32)
  ids = rng.integers(1000, 30000, (4, LEN)).astype(np.int32)
  ids[:, 9:] = 0
  for method, x in ((model.encode_image, images), (model.encode_text, ids)):
    plain = model.apply({"params": params}, x, method=method)[0]
    with layers.export_form():
      exported = model.apply({"params": params}, x, method=method)[0]
    np.testing.assert_allclose(np.asarray(exported), np.asarray(plain), atol=1e-5)


def test_format_names_match_the_config_check():
  from export import stage
  from mcad_jax import config_lib

  assert config_lib.EXPORT_FORMATS == tuple(stage.FORMATS)


@pytest.mark.parametrize("enc", ["image", "text"])
def test_npu_recipes_are_ready_and_close(tmp_path, tiny, enc):
  """The `npu` recipes: static full-integer files that pass the readiness check, with integer
  I/O, per-channel (npu) or per-tensor (npu_per_tensor) weights, and close to JAX."""
  from export import npu, quantize
  from export.stage import parity

  _, _, sm, data, ref = tiny
  fp32 = convert.to_tflite(sm, enc, "fp32")
  for recipe, weights in (("npu", "per-channel"), ("npu_per_tensor", "per-tensor")):
    buf = quantize.quantize(fp32, data[enc][:32], recipe)
    r = npu.inspect(buf)
    assert r["ready"] and not r["float_activations"] and r["static_shapes"], r["problems"]
    assert r["io"]["output"] == ["INT8"] and r["io"]["input"] == ["INT8" if enc == "image" else "INT32"]
    if enc == "image":  # The text tower's embedding table is one gathered tensor, per tensor.
      assert npu.granularity(r) == weights
    path = tmp_path / f"{enc}_{recipe}.tflite"
    path.write_bytes(buf)
    p = parity(ref[enc], runtime.TFLiteEncoder(str(path))(data[enc]))
    # A random-init model on random inputs, 32 calibration examples: 0.988-0.990 at npu. Before
    # the pool's export form its image file gave 0 (all-zero embeddings).
    assert p["cosine_min"] >= 0.98, (recipe, p)


def test_npu_readiness_fails_on_the_hybrid_int8_file(tiny):
  """Today's `dynamic_w8` int8 file (int8 weights, float activations) is not NPU-ready, and the
  check names its ops."""
  from export import npu, quantize

  _, _, sm, data, _ = tiny
  buf = quantize.quantize(convert.to_tflite(sm, "image", "fp32"), data["image"][:4], "dynamic_w8")
  r = npu.inspect(buf)
  assert not r["ready"] and r["float_activations"]
  assert any("FULLY_CONNECTED: FLOAT32 activation" in p for p in r["problems"]), r["problems"][:5]
  assert npu.inspect(convert.to_tflite(sm, "image", "fp32"))["ready"] is False


def test_npu_readiness_names_the_one_float_op_of_a_small_graph(tmp_path):
  """A small int8 graph around one op with no int8 kernel (SIN): the converter leaves it float
  between a DEQUANTIZE and a QUANTIZE; the check fails and names it."""
  import tensorflow as tf

  from export import npu

  w = tf.constant(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))

  @tf.function(input_signature=[tf.TensorSpec((1, 8), tf.float32)])
  def f(x):
    return tf.matmul(tf.sin(tf.matmul(x, w)), w)

  conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
  conv.optimizations = [tf.lite.Optimize.DEFAULT]
  conv.representative_dataset = lambda: ([np.random.default_rng(i).standard_normal((1, 8))
                                          .astype(np.float32)] for i in range(16))
  buf = conv.convert()
  r = npu.inspect(buf)
  assert "SIN" in runtime.tflite_ops(buf) and not r["ready"]
  assert any(" SIN: FLOAT32 activation" in p for p in r["problems"]), r["problems"]
  assert all("SIN" in p or "QUANTIZE" in p for p in r["problems"]), r["problems"]
  assert any(o["op"] == "FULLY_CONNECTED" and o["outputs"] == ["INT8"] for o in r["ops"])
