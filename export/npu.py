"""NPU readiness of a .tflite file: does every op run on integer activations, with static shapes?

NPU delegates (Qualcomm QNN / Hexagon, MediaTek NeuroPilot, Google Tensor) run
static full-integer graphs: every activation an integer tensor with a scale
fixed at conversion. A hybrid file (int8 weights, float activations, as the
`dynamic_w8` int8 recipe makes) runs on ARM CPUs but is refused there or split
back onto the CPU. The check, per op of the file's main subgraph:

- every tensor computed from the input (an activation) has an integer or bool type,
  except a float graph input read only by QUANTIZE ops and a float graph output
  written only by a DEQUANTIZE op (a float interface around an integer graph);
- builtin ops only;
- every tensor shape static (no -1 in a shape signature).

It also counts the weight matrices (of matmuls, convolutions and embedding
gathers) by quantization granularity, per-channel or per-tensor: some delegates
refuse per-channel int8 weights. Reads the
flatbuffer with `ai-edge-litert` only (no TensorFlow).
"""

from __future__ import annotations

import numpy as np

# Ops whose constant operands are weight matrices (the granularity a delegate may refuse).
_WEIGHTED = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "BATCH_MATMUL",
             "GATHER", "GATHER_ND", "EMBEDDING_LOOKUP"}
_INT_TYPES = {"INT8", "UINT8", "INT16", "INT32", "INT64", "BOOL", "INT4", "UINT16", "UINT32"}


def _names(enum_cls) -> dict[int, str]:
  return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def inspect(buf: bytes) -> dict:
  """The readiness of one flatbuffer.

  Returns:
    {'ready': bool, 'problems': [str] (each naming the op and tensor),
     'ops': [{'op', 'inputs': [type], 'outputs': [type]}] for every op (activations only),
     'float_activations': [tensor name], 'weights': {'per-channel': n, 'per-tensor': n,
     'float': n}, 'static_shapes': bool, 'io': {'input': [type], 'output': [type]}}.
  """
  from ai_edge_litert import schema_py_generated as schema

  model = schema.ModelT.InitFromPackedBuf(buf, 0)
  op_names, type_names = _names(schema.BuiltinOperator), _names(schema.TensorType)
  sub = model.subgraphs[0]
  tensors = sub.tensors

  def is_const(i: int) -> bool:
    b = model.buffers[tensors[i].buffer]
    # Buffer 0 is the empty sentinel; files over 2 GB keep data out of line (offset, size).
    return b is not None and ((b.data is not None and len(b.data) > 0) or getattr(b, "size", 0) > 0)

  def ttype(i: int) -> str:
    return type_names.get(tensors[i].type, str(tensors[i].type))

  def tname(i: int) -> str:
    n = tensors[i].name
    return n.decode() if isinstance(n, bytes) else str(n)

  def op_name(op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    bc = max(code.builtinCode, code.deprecatedBuiltinCode)
    if bc == schema.BuiltinOperator.CUSTOM:
      c = code.customCode
      return f"CUSTOM:{c.decode() if isinstance(c, bytes) else c}"
    return op_names.get(bc, f"UNKNOWN_{bc}")

  inputs = [int(i) for i in sub.inputs]
  outputs = [int(i) for i in sub.outputs]
  readers: dict[int, list[str]] = {}
  writer: dict[int, str] = {}
  for op in sub.operators:
    name = op_name(op)
    for i in op.inputs:
      if i >= 0:
        readers.setdefault(int(i), []).append(name)
    for i in op.outputs:
      writer[int(i)] = name

  problems, float_acts, ops = [], [], []
  weights = {"per-channel": 0, "per-tensor": 0, "float": 0}
  for k, op in enumerate(sub.operators):
    name = op_name(op)
    if name.startswith(("CUSTOM:", "UNKNOWN_")):
      problems.append(f"op {k} {name}: not a builtin op")
    ins = [int(i) for i in op.inputs if i >= 0 and not is_const(int(i))]
    outs = [int(i) for i in op.outputs if i >= 0]
    ops.append({"op": name, "inputs": [ttype(i) for i in ins], "outputs": [ttype(i) for i in outs]})
    for i in op.inputs:
      if i < 0 or not is_const(int(i)):
        continue
      q = tensors[i].quantization
      scales = q.scale if q is not None and q.scale is not None else []
      if name not in _WEIGHTED:  # Element-wise constants (LayerNorm scales, ...) are per tensor.
        continue
      if ttype(i) in ("FLOAT32", "FLOAT16"):
        weights["float"] += 1
      elif len(scales) > 1:
        weights["per-channel"] += 1
      elif len(scales) == 1 and ttype(i) in ("INT8", "INT4", "INT16"):
        weights["per-tensor"] += 1
    for i in ins + outs:
      if ttype(i) in _INT_TYPES:
        continue
      # The float interface: an input only quantized, an output only dequantized.
      if i in inputs and i in ins and all(r == "QUANTIZE" for r in readers.get(i, [])):
        continue
      if i in outputs and i in outs and name == "DEQUANTIZE":
        continue
      where = "input" if i in ins else "output"
      problems.append(f"op {k} {name}: {ttype(i)} activation {where} {tname(i)!r}")
      if tname(i) not in float_acts:
        float_acts.append(tname(i))
  static = True
  for i, t in enumerate(tensors):
    sig = t.shapeSignature
    if sig is not None and np.any(np.asarray(sig) < 0):
      static = False
      problems.append(f"tensor {tname(i)!r}: dynamic shape {list(sig)}")
  return {"ready": not problems, "problems": problems, "ops": ops, "float_activations": float_acts,
          "weights": weights, "static_shapes": static,
          "io": {"input": [ttype(i) for i in inputs], "output": [ttype(i) for i in outputs]}}


def granularity(report: dict) -> str:
  """'per-channel', 'per-tensor', 'mixed' or 'none': how a file's integer weights are scaled."""
  w = report["weights"]
  kinds = [k for k in ("per-channel", "per-tensor") if w[k]]
  return kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "none")


def op_table(report: dict) -> list[tuple[str, int, str, str]]:
  """(op, count, input types, output types) per distinct op signature, in first-seen order."""
  rows: dict[tuple[str, str, str], int] = {}
  for o in report["ops"]:
    key = (o["op"], ",".join(o["inputs"]) or "-", ",".join(o["outputs"]))
    rows[key] = rows.get(key, 0) + 1
  return [(op, n, i, o) for (op, i, o), n in rows.items()]
