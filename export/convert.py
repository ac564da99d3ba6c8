"""Student checkpoint -> SavedModel (jax2tf) -> TFLite files, and -> ONNX (jax2onnx).

The image and text encoders are separate files: a phone indexes its gallery
offline with the image encoder and encodes queries online with the text one.
Every graph has a static batch (polymorphic shapes do not lower to TFLite
builtins, docs/stack.md) and the converter is held to TFLITE_BUILTINS, so an op
without a builtin kernel fails the conversion instead of pulling in Flex ops.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mcad_jax import fileio

FORMATS = ("fp32", "fp16", "dynamic", "int8")
ENCODERS = ("image", "text")


class ExportError(RuntimeError):
  """An export that must not ship: unsupported op, failed conversion, bad parity."""


def encoder_fns(model, params, form: Callable | None = None) -> dict[str, Callable]:
  """{'image': uint8/float [B,S,S,3] -> zimg, 'text': int32 [B,L] -> ztxt} with params closed over.

  Args:
    form: a context manager factory the encoders are traced under; default the export's
      integer-friendly forms (`layers.export_form`: two-pass LayerNorm, matmul pools, ...).
      The benchmarks pass others to compare graphs.
  """
  from mcad_jax.models.layers import export_form

  form = form or export_form

  def image(x):
    with form():
      return model.apply({"params": params}, x.astype(jnp.float32), method=model.encode_image)[0]

  def text(ids):
    with form():
      return model.apply({"params": params}, ids, method=model.encode_text)[0]

  return {"image": image, "text": text}


def input_specs(image_size: int, text_len: int, batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Encoder inputs: float32 pixels in 0..255 (so int8 conversion can quantize them) and int32 ids."""
  return {"image": ((batch, image_size, image_size, 3), np.dtype(np.float32)),
          "text": ((batch, text_len), np.dtype(np.int32))}


def _as_signature(tf_fn):
  def sig(x):
    return {"embedding": tf_fn(x)}
  return sig


def save_savedmodel(fns: dict[str, Callable], specs: dict, path: str, uint8_image: bool = True) -> str:
  """Writes a SavedModel with `encode_image` and `encode_text` signatures (output `embedding`).

  With `uint8_image`, an `encode_image_uint8` signature also takes uint8 pixels
  (same function: the model casts to float). TFLite files are converted from the
  float one, which full-integer quantization needs.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  module = tf.Module()
  signatures = {}
  fns, specs = dict(fns), dict(specs)
  if uint8_image and "image" in fns:
    fns["image_uint8"] = fns["image"]
    specs["image_uint8"] = (specs["image"][0], np.dtype(np.uint8))
  for name, fn in fns.items():
    shape, dtype = specs[name]
    arg = "image" if name.startswith("image") else "ids"
    wrapped = tf.function(_as_signature(jax2tf.convert(fn, with_gradient=False)), autograph=False,
                          input_signature=[tf.TensorSpec(shape, tf.as_dtype(dtype), name=arg)])
    setattr(module, f"encode_{name}", wrapped)
    signatures[f"encode_{name}"] = wrapped.get_concrete_function()
  tf.saved_model.save(module, path, signatures=signatures)
  return path


def to_tflite(saved_model: str, encoder: str, fmt: str,
              representative: Callable[[], Iterable[list[np.ndarray]]] | None = None,
              int8_io: bool = False) -> bytes:
  """Converts one signature of the SavedModel to a TFLite flatbuffer, builtin ops only.

  Args:
    saved_model: directory written by `save_savedmodel`.
    encoder: 'image' or 'text'.
    fmt: 'fp32', 'fp16' (fp16 weights), 'dynamic' (int8 weights, float activations) or
      'int8' (full integer: weights and activations, calibrated on `representative`).
    representative: for int8, a callable yielding [input] lists drawn from training data.
    int8_io: for int8, also make the interface integer (image in as uint8 pixels, embedding
      out as int8), as NPU delegates want. Token ids stay int32.
  """
  import tensorflow as tf

  if fmt not in FORMATS:
    raise ValueError(f"unknown TFLite format {fmt!r}; known {FORMATS}")
  conv = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[f"encode_{encoder}"])
  conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if fmt == "fp16":
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
  elif fmt == "dynamic":
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
  elif fmt == "int8":
    if representative is None:
      raise ValueError("int8 conversion needs a representative dataset")
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
      if encoder == "image":
        conv.inference_input_type = tf.uint8
      conv.inference_output_type = tf.int8
  try:
    return conv.convert()
  except Exception as e:  # The converter raises ConverterError and friends.
    raise ExportError(f"TFLite conversion of encode_{encoder} ({fmt}) failed, builtin ops only: "
                      f"{_summarize(str(e))}") from e


def _summarize(msg: str) -> str:
  """The converter's error without the serialized StableHLO module it quotes."""
  keep = [ln.strip()[:300] for ln in msg.splitlines()
          if any(k in ln for k in ("neither a custom op", "Custom ops:", "failed to legalize",
                                   "is not supported", "error:"))]
  calls = sorted(set(re.findall(r"([a-z][a-z0-9_]*?_ffi)", msg)))
  if calls:
    keep.append(f"custom calls with no TFLite kernel: {', '.join(calls)}")
  return "\n  ".join(dict.fromkeys(keep)) or msg[:2000]


def to_onnx(fn: Callable, spec: tuple[tuple[int, ...], np.dtype], path: str, name: str) -> str:
  """Exports `fn` through jax2onnx and checks the graph with onnx.checker."""
  import onnx
  from jax2onnx import to_onnx as j2o

  shape, dtype = spec
  model = j2o(fn, [jax.ShapeDtypeStruct(shape, dtype)], model_name=name)
  onnx.checker.check_model(model, full_check=True)
  with fileio.atomic_path(path) as tmp:
    onnx.save(model, tmp)
  return path
