"""Static full-integer (NPU) recipes for a trained student: parity, retrieval, and where error enters.

  python -m benchmarks.npu_recipes --workdir W [--graph export|plain] [--ranges min_max|moving_average]
      [--recipes tf_int8 a8w8 a16w8 npu npu_per_tensor] [--layers a8w8] [--calib 200]

Traces the student's encoders (`--graph export`: the export's forms,
mcad_jax/models/layers.py `export_form`; `plain`: the forms before issue 28,
two-pass LayerNorm only), converts them to float TFLite and quantizes them with
each recipe (export/quantize.py; `tf_int8` is the TF converter's full int8),
calibrated on the same training examples. Per recipe: min and mean cosine to
JAX on 256 held-out test examples, R@1 change against the JAX student on the
test split, and NPU readiness (export/npu.py). With `--layers R`, recipe R's
file is compared with the float file tensor by tensor on the 16 held-out
examples with the worst output cosine (LiteRT, all tensors kept): each
activation's min cosine over them, printed in graph order, so the op where the
error enters is the first whose cosine falls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import jax
import numpy as np


def _tensors(buf: bytes, xs: np.ndarray) -> dict[str, list[np.ndarray]]:
  """Every tensor of `buf` (dequantized) on each example of xs, by name."""
  from ai_edge_litert.interpreter import Interpreter

  it = Interpreter(model_content=buf, experimental_preserve_all_tensors=True)
  it.allocate_tensors()
  inp = it.get_input_details()[0]
  out: dict[str, list[np.ndarray]] = {}
  for x in xs:
    x = x[None].astype(np.float32)
    if inp["quantization"][0]:  # An integer interface: quantize as the file says.
      scale, zp = inp["quantization"]
      info = np.iinfo(inp["dtype"])
      x = np.clip(np.round(x / scale + zp), info.min, info.max)
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    for d in it.get_tensor_details():
      try:
        v = it.get_tensor(d["index"])
      except ValueError:
        continue
      scale, zp = d["quantization"]
      v = (v.astype(np.float64) - zp) * scale if scale else v.astype(np.float64)
      out.setdefault(d["name"], []).append(v.ravel())
  return out


def layer_report(fbuf: bytes, qbuf: bytes, xs: np.ndarray) -> list[tuple[str, str, float]]:
  """(op, output tensor, min cosine over xs) for each op of qbuf whose output the float file has."""
  from ai_edge_litert import schema_py_generated as schema

  f, q = _tensors(fbuf, xs), _tensors(qbuf, xs)
  model = schema.ModelT.InitFromPackedBuf(qbuf, 0)
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  sub = model.subgraphs[0]
  rows = []
  for op in sub.operators:
    code = model.operatorCodes[op.opcodeIndex]
    opname = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
    for t in op.outputs:
      name = sub.tensors[t].name.decode()
      if name in f and name in q and all(a.shape == b.shape for a, b in zip(f[name], q[name], strict=True)):
        cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
               for a, b in zip(f[name], q[name], strict=True)]
        rows.append((opname, name, float(min(cos))))
  return rows


def main():
  from export import quantize

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--recipes", nargs="+", default=["tf_int8", "a8w8", "a16w8", "npu", "npu_per_tensor"])
  ap.add_argument("--graph", choices=("export", "plain"), default="export")
  ap.add_argument("--ranges", choices=quantize.RANGES, default="min_max")
  ap.add_argument("--calib", type=int, default=quantize.MAX_CALIBRATION)
  ap.add_argument("--layers", nargs="*", default=[], help="recipes to compare tensor by tensor")
  args = ap.parse_args()

  from export import convert, npu, runtime, stage
  from export.__main__ import load_run_config
  from mcad_jax import evaluate
  from mcad_jax.models import layers

  config = load_run_config(args.workdir)
  src = config.export.source if "export" in config else "distill"
  model, params = stage.load_student(config, args.workdir, src)
  tok = stage.student_tokenizer(config, src)
  fns = convert.encoder_fns(model, params, layers.export_form if args.graph == "export"
                            else layers.two_pass_layer_norm)
  test = stage._test_data(config, config.data.eval_limit or None, tok)
  images = test.images.astype(np.float32)
  full = {"image": images, "text": test.texts}
  ref_full = {k: np.asarray(jax.jit(fns[k])(v)) for k, v in full.items()}
  base = evaluate.recall_metrics(ref_full["image"], ref_full["text"])
  calib = stage.calibration_data(config, args.calib, tok)
  specs = convert.input_specs(config.data.image_size, tok.max_len, 1)
  rows = []
  with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(open(os.devnull, "w")):
    sm = convert.save_savedmodel(fns, specs, os.path.join(tmp, "sm"), uint8_image=False)
    fp32 = {enc: convert.to_tflite(sm, enc, "fp32") for enc in fns}
    for name in args.recipes:
      row, emb = {"recipe": name}, {}
      for enc in fns:
        if name == "tf_int8":
          buf = convert.to_tflite(sm, enc, "int8", stage.representative(calib[enc]))
        else:
          buf = quantize.quantize(fp32[enc], calib[enc], name, args.ranges)
        path = os.path.join(tmp, f"{enc}_{name}.tflite")
        with open(path, "wb") as f:
          f.write(buf)
        emb[enc] = runtime.TFLiteEncoder(path)(full[enc])
        p = stage.parity(ref_full[enc][:256], emb[enc][:256])
        ready = npu.inspect(buf)
        row[enc] = {**p, "ready": ready["ready"], "float_ops": len(ready["float_activations"])}
        if name in args.layers:
          cos = np.sum(ref_full[enc][:256] * emb[enc][:256], 1) / np.linalg.norm(emb[enc][:256], axis=1)
          worst = full[enc][:256][np.argsort(cos)[:16]]
          print(f"\n{name} {enc}: min cosine over the 16 worst held-out examples, per op output",
                file=sys.__stdout__)
          prev = 1.0
          for op, t, c in layer_report(fp32[enc], buf, worst):
            mark = " <--" if c < prev - 0.01 else ""
            print(f"  {op:16s} {c:8.4f}  {t[-70:]}{mark}", file=sys.__stdout__)
            prev = c
      m = evaluate.recall_metrics(emb["image"], emb["text"])
      row["di2t"], row["dt2i"] = m["i2t_r1"] - base["i2t_r1"], m["t2i_r1"] - base["t2i_r1"]
      rows.append(row)
      i, t = row["image"], row["text"]
      print(f"| {name} | {args.graph} | {args.ranges} | {i['cosine_min']:.4f} | {i['cosine_mean']:.4f} | "
            f"{t['cosine_min']:.4f} | {t['cosine_mean']:.4f} | {row['di2t']:+.2f} | {row['dt2i']:+.2f} | "
            f"{'yes' if i['ready'] and t['ready'] else 'no'} |", file=sys.__stdout__, flush=True)
  print(f"JAX R@1 i2t {base['i2t_r1']:.2f} t2i {base['t2i_r1']:.2f}", file=sys.__stdout__)


if __name__ == "__main__":
  main()
