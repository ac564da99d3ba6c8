"""Running exported encoders the way a phone does: LiteRT interpreter (XNNPACK), or onnxruntime.

Needs only `ai-edge-litert` (and `onnxruntime` for .onnx files), not TensorFlow,
so the search CLI and the latency benchmark run on a lean install.
"""

from __future__ import annotations

import os

import numpy as np


class ModelFileError(ValueError):
  """A model file that is missing, truncated or not a model."""


def _need_file(path: str) -> None:
  if not os.path.isfile(path):
    raise ModelFileError(f"{path}: no such model file (run the export stage: python -m export "
                         f"--workdir W)")


def _read(path: str) -> bytes:
  _need_file(path)
  with open(path, "rb") as f:
    return f.read()


def tflite_ops(path_or_bytes) -> list[str]:
  """Sorted names of the operators in a .tflite flatbuffer; custom ops as 'CUSTOM:<name>'."""
  from ai_edge_litert import schema_py_generated as schema

  buf = _read(path_or_bytes) if isinstance(path_or_bytes, str) else path_or_bytes
  # A flatbuffer's file identifier sits at bytes 4..8; "TFL3" for TFLite models.
  if len(buf) < 8 or buf[4:8] != b"TFL3":
    raise ModelFileError(f"{path_or_bytes if isinstance(path_or_bytes, str) else '<bytes>'}: "
                         "not a TFLite flatbuffer (no TFL3 identifier)")
  try:
    model = schema.ModelT.InitFromPackedBuf(buf, 0)
  except Exception as e:
    raise ModelFileError(f"TFLite flatbuffer does not parse (truncated or corrupt?): {e}") from e
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  ops = set()
  for sub in model.subgraphs or []:
    for op in sub.operators or []:
      code = model.operatorCodes[op.opcodeIndex]
      # Newer schemas carry the code in builtinCode; deprecatedBuiltinCode caps at 127.
      bc = max(code.builtinCode, code.deprecatedBuiltinCode)
      if bc == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        ops.add(f"CUSTOM:{custom}")
      else:
        ops.add(names.get(bc, f"UNKNOWN_{bc}"))
  return sorted(ops)


def non_builtin(ops: list[str]) -> list[str]:
  return [o for o in ops if o.startswith(("CUSTOM:", "UNKNOWN_", "Flex"))]


class TFLiteEncoder:
  """One exported encoder (image or text) in the LiteRT interpreter.

  Handles quantized interfaces: float inputs are quantized with the input's
  (scale, zero point), integer outputs are returned as stored (`raw=True`) or
  dequantized. Batches larger than the model's static batch are run in chunks.
  """

  def __init__(self, path: str, num_threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    _need_file(path)
    with open(path, "rb") as f:
      head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
      raise ModelFileError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
      # By path, not by content: LiteRT maps the file and verifies the flatbuffer, so weights it
      # never touches (most of a text encoder's word-embedding table) stay out of resident
      # memory; read into a Python buffer, the whole file would be (BENCHMARKS.md, peak RSS).
      self.interp = Interpreter(model_path=path, num_threads=num_threads)
      self.interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
      raise ModelFileError(f"{path}: LiteRT cannot load it (truncated or corrupt?): {e}") from e
    self.path = path
    self.inp = self.interp.get_input_details()[0]
    self.out = self.interp.get_output_details()[0]
    self.batch = int(self.inp["shape"][0])

  @property
  def input_dtype(self):
    return self.inp["dtype"]

  @property
  def output_quant(self) -> tuple[float, int]:
    return tuple(self.out["quantization"])

  def _quantize_in(self, x: np.ndarray) -> np.ndarray:
    dt = self.inp["dtype"]
    if np.issubdtype(dt, np.floating) or dt == np.int32:
      return x.astype(dt)
    scale, zp = self.inp["quantization"]
    info = np.iinfo(dt)
    return np.clip(np.round(x.astype(np.float32) / scale + zp), info.min, info.max).astype(dt)

  def __call__(self, x: np.ndarray, raw: bool = False) -> np.ndarray:
    n = len(x)
    pad = (-n) % self.batch
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    outs = []
    for s in range(0, len(x), self.batch):
      self.interp.set_tensor(self.inp["index"], self._quantize_in(x[s:s + self.batch]))
      self.interp.invoke()
      outs.append(self.interp.get_tensor(self.out["index"]).copy())
    y = np.concatenate(outs)[:n]
    if raw or np.issubdtype(y.dtype, np.floating):
      return y
    scale, zp = self.out["quantization"]
    return (y.astype(np.float32) - zp) * scale


class OnnxEncoder:
  """An exported .onnx encoder in onnxruntime (CPU)."""

  def __init__(self, path: str, num_threads: int = 1):
    import onnxruntime as ort

    _read(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.log_severity_level = 3  # Errors only: jax2onnx graphs keep a few unused shape constants.
    try:
      self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
      raise ModelFileError(f"{path}: onnxruntime cannot load it: {e}") from e
    self.path = path
    self.inp = self.sess.get_inputs()[0]
    self.batch = self.inp.shape[0] if isinstance(self.inp.shape[0], int) else None

  def __call__(self, x: np.ndarray) -> np.ndarray:
    dt = np.float32 if "float" in self.inp.type else np.int32
    if self.batch is None:
      return self.sess.run(None, {self.inp.name: x.astype(dt)})[0]
    n, pad = len(x), (-len(x)) % self.batch
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    outs = [self.sess.run(None, {self.inp.name: x[s:s + self.batch].astype(dt)})[0]
            for s in range(0, len(x), self.batch)]
    return np.concatenate(outs)[:n]
