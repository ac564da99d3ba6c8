"""Export: conversion and parity on a tiny model, int8, op rejection, the index and bad files."""

import os

import jax
import jax.numpy as jnp
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
  assert "QUANTIZE" in ops and not runtime.non_builtin(ops)
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


def test_index_int8_scores_are_exact_integer_dots():
  e = _emb(50, 16)
  ix = index.Index.build(e, "int8")
  q = e[:3]
  qi = np.clip(np.round(q * 127), -127, 127).astype(np.int64)
  want = (qi @ ix.rows.astype(np.int64).T) / 127.0 / 127.0
  np.testing.assert_allclose(ix.scores(q), want, rtol=1e-6)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:20], "shorter than"),
    (lambda b: b[:-7], "truncated"),
    (lambda b: b[:50] + bytes([b[50] ^ 0xFF]) + b[51:], "data checksum"),
    (lambda b: b[:17] + bytes([b[17] ^ 0x01]) + b[18:], "header checksum"),
    (lambda b: b"NOTANIDX" + b[8:], "not an mcad index"),
])
def test_damaged_index_is_refused(tmp_path, damage, match):
  path = tmp_path / "g.idx"
  index.Index.build(_emb(), "int8").save(str(path))
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(index.IndexFileError, match=match):
    index.Index.load(str(path))


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
