"""The export stage: a finished student -> verified TFLite and ONNX encoders, report and index.

Runs as the last stage of a pipeline (`kind='export'` in the config; see
`mcad_jax.config_lib.export_stage_config`) or alone on any workdir whose
student stage finished:

  python -m export --workdir W [--source distill] [--formats fp32 int8] [--no-onnx]

For every exported file it records the size, the op list (builtins only, or
the stage fails), and the embedding parity with JAX on held-out test examples
(min cosine, max abs error), failing below the configured cosine floor. The
files named in `reeval` are re-run through the whole retrieval eval as rows
`student_<format>`. Everything lands in `W/export/` with `report.md`, and in the
`export` section of `W/results.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import numpy as np

from export import convert, index, npu, quantize, runtime
from mcad_jax import fileio, tool_output

log = logging.getLogger(__name__)

# Every TFLite format the stage makes, in one place: how each is made and which floors hold it.
#   make 'tf': the TF converter's own format (convert.to_tflite); 'int8': export.int8_recipe;
#   'quantizer': the named ai-edge-quantizer recipe (export/quantize.py) on the fp32 file.
#   floor: the config keys <floor>_cosine_min and <floor>_r1_drop_max (float files: cosine only).
#   npu: the file must pass the NPU readiness check (export/npu.py) or the export fails.
# mcad_jax/config_lib.py's EXPORT_FORMATS mirrors the names (tests/test_export.py holds them equal).
FORMATS: dict[str, dict] = {
    "fp32": {"make": "tf", "floor": "float"},
    "fp16": {"make": "tf", "floor": "float"},
    "dynamic": {"make": "tf", "floor": "quant"},
    "int8": {"make": "int8", "floor": "quant"},
    # Static full-integer, integer I/O (int8 pixels in, int8 embedding out; ids stay int32).
    "npu": {"make": "quantizer", "recipe": "npu", "floor": "npu", "npu": True},
    "npu_per_tensor": {"make": "quantizer", "recipe": "npu_per_tensor", "floor": "npu_per_tensor",
                       "npu": True},
}
FLOAT_FORMATS = ("fp32", "fp16", "onnx")


def load_student(config, workdir: str, source: str):
  """(model, params) of the student trained by stage `source` (a dual or distill stage)."""
  from mcad_jax import checkpoint, stages

  scfg = config[source]
  model = stages.dual_model(config, scfg.model)
  img, txt = stages.dummy_batch(config, model_cfg=scfg.model)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), img, txt)["params"])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), shapes)
  if scfg.kind == "distill":
    abstract = {"student": abstract}  # The distillation heads and teachers are left behind.
  ckdir = stages.checkpoint_dir(config, workdir, source)
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"no checkpoints for stage {source!r} in {ckdir}: train it first")
  params = checkpoint.load_params(ckdir, abstract)
  return model, (params["student"] if scfg.kind == "distill" else params)


def student_tokenizer(config, source: str):
  """The exported student's own tokenizer (its model's `tokenizer`, else the run's default)."""
  from mcad_jax import stages

  return stages.tokenizer(config, config[source].model)


def _test_data(config, limit: int | None, tok):
  from mcad_jax.data import pipeline

  return pipeline.eval_set(config.data, tok, limit=limit)


def calibration_data(config, n: int, tok):
  """n images and n captions (those of the first n / 5 images) of the *training* split, for int8
  calibration."""
  from mcad_jax.data import pipeline

  data = pipeline.eval_set(config.data, tok, split=config.data.train_split, limit=n)
  return {"image": data.images.astype(np.float32), "text": data.texts[:n]}


def representative(xs: np.ndarray):
  """The converter's representative dataset: a callable yielding [one example] lists."""
  def gen():
    for x in xs:
      yield [x[None]]

  return gen


def parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
  return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
          "max_abs_err": float(np.abs(ref - got).max())}


def _check(ecfg, fmt: str, r: dict) -> str | None:
  """Why a file fails its parity floor, or None.

  Every held-out example counts: float files must keep their min cosine >=
  float_cosine_min, quantized ones >= quant_cosine_min; either failing fails
  the export.
  """
  floor = ecfg.float_cosine_min if fmt == "onnx" else ecfg[f"{FORMATS[fmt]['floor']}_cosine_min"]
  return f"cosine_min {r['cosine_min']:.5f} < {floor}" if r["cosine_min"] < floor else None


def _check_retrieval(ecfg, retrieval: dict, num_images: int, num_texts: int) -> list[str]:
  """Quantized formats whose R@1 (either way) falls more than quant_r1_drop_max below fp32's.

  On a small test set one query moves R@1 by more than the allowance, so a drop of
  quant_r1_drop_queries queries (default 1) is always allowed: the floor is in points on a
  large test set and in queries on a small one.
  """
  ref = retrieval.get("student_fp32")
  bad = []
  for row, m in retrieval.items():
    if ref is None or row in ("student_fp32", "student_fp16", "student_onnx"):
      continue
    floor = FORMATS.get(row.removeprefix("student_"), {}).get("floor", "quant")
    for key, n in (("i2t_r1", num_images), ("t2i_r1", num_texts)):
      allowed = max(ecfg.get(f"{floor}_r1_drop_max", ecfg.quant_r1_drop_max),
                    100.0 * ecfg.get("quant_r1_drop_queries", 1) / n + 1e-9)
      if ref[key] - m[key] > allowed:
        bad.append(f"{row}: {key} {m[key]:.2f} is {ref[key] - m[key]:.2f} below fp32's "
                   f"{ref[key]:.2f} (allowed {allowed:.2f})")
  return bad


def _convert_all(ecfg, out: str, fns, specs, sm_dir: str, calib, ref, held):
  """Writes every TFLite (and ONNX) file with its parity to JAX: (files record, encoders)."""
  convert.save_savedmodel(fns, specs, sm_dir)
  files: dict[str, dict] = {}
  encoders: dict[tuple[str, str], object] = {}
  fp32: dict[str, bytes] = {}
  readiness: dict[str, dict] = {}
  for fmt in ecfg.formats:
    for enc in convert.ENCODERS:
      fname = f"student_{enc}_{fmt}.tflite"
      recipe = FORMATS[fmt].get("recipe", ecfg.int8_recipe if fmt == "int8" else None)
      if FORMATS[fmt]["make"] == "quantizer" or (fmt == "int8" and ecfg.int8_recipe != "tf"):
        # ai-edge-quantizer works on the float flatbuffer (export/quantize.py).
        if enc not in fp32:
          fp32[enc] = convert.to_tflite(sm_dir, enc, "fp32")
        buf = quantize.quantize(fp32[enc], calib[enc], recipe)
      else:
        rep = representative(calib[enc]) if fmt == "int8" else None
        buf = convert.to_tflite(sm_dir, enc, fmt, rep, int8_io=ecfg.int8_io)
        if fmt == "fp32":
          fp32[enc] = buf
      ops = runtime.tflite_ops(buf)
      bad = runtime.non_builtin(ops)
      if bad:
        raise convert.ExportError(f"{fname}: non-builtin ops {bad}; the model code must avoid them")
      ready = npu.inspect(buf)
      if FORMATS[fmt].get("npu") and not ready["ready"]:
        raise convert.ExportError(f"{fname} is not NPU-ready, so it cannot be labelled {fmt!r}: "
                                  + "; ".join(ready["problems"][:5]))
      path = os.path.join(out, fname)
      fileio.atomic_write(path, buf)
      e = runtime.TFLiteEncoder(path)
      encoders[(enc, fmt)] = e
      files[fname] = {"bytes": len(buf), "ops": ops, "format": fmt, "encoder": enc,
                      **parity(ref[enc], e(held[enc])),
                      "npu_ready": ready["ready"], "weights": npu.granularity(ready),
                      "float_activations": len(ready["float_activations"]),
                      "static_shapes": ready["static_shapes"], "io": ready["io"]}
      readiness[fname] = ready
      log.info("%s: %d bytes, cosine min %.5f", fname, len(buf), files[fname]["cosine_min"])
  if ecfg.onnx:
    import onnx

    for enc in convert.ENCODERS:
      fname = f"student_{enc}.onnx"
      path = os.path.join(out, fname)
      convert.to_onnx(fns[enc], specs[enc], path, f"student_{enc}")
      e = runtime.OnnxEncoder(path)
      encoders[(enc, "onnx")] = e
      ops = sorted({n.op_type for n in onnx.load(path).graph.node})
      files[fname] = {"bytes": os.path.getsize(path), "ops": ops, "format": "onnx", "encoder": enc,
                      **parity(ref[enc], e(held[enc]))}
  # Every TFLite op with its activation types, per file (the report keeps a summary).
  fileio.write_json(os.path.join(out, "npu_readiness.json"), readiness, indent=None)
  return files, encoders, readiness


def run_export(config, workdir: str, name: str = "export") -> dict:
  """Exports, verifies and indexes the student; returns the stage record (see mcad_jax/run.py run_stages)."""
  from mcad_jax import evaluate

  t0 = time.time()
  ecfg = config[name]
  out = os.path.join(workdir, name)
  os.makedirs(out, exist_ok=True)
  model, params = load_student(config, workdir, ecfg.source)
  fns = convert.encoder_fns(model, params)
  tok = student_tokenizer(config, ecfg.source)
  specs = convert.input_specs(config.data.image_size, tok.max_len, ecfg.batch_size)

  # Held-out parity data: the head of the test split; retrieval re-eval: the configured test set.
  test = _test_data(config, config.data.eval_limit or None, tok)
  test_images = test.images.astype(np.float32)
  held = {"image": test_images[:ecfg.parity_examples], "text": test.texts[:ecfg.parity_examples]}
  ref = {k: np.asarray(jax.jit(fns[k])(held[k])) for k in held}
  quantized = any(FORMATS[f]["make"] != "tf" for f in ecfg.formats)
  calib = calibration_data(config, ecfg.representative_examples, tok) if quantized else None

  sm_dir = os.path.join(out, "saved_model")
  shutil.rmtree(sm_dir, ignore_errors=True)
  # The converters', quantizer's and interpreter's own output goes to W/export/tools.log.
  with tool_output.tool_output_to(os.path.join(out, "tools.log")):
    files, encoders, readiness = _convert_all(ecfg, out, fns, specs, sm_dir, calib, ref, held)

  failed = []
  for f, r in files.items():
    why = _check(ecfg, r["format"], r)
    r["below_floor"] = why is not None
    if why:
      failed.append(f"{f}: {why}")

  # Retrieval with the exported encoders, on the same test set as the JAX rows; each file
  # embeds the test set once, for the re-eval and the gallery index alike.
  embedded: dict[tuple[str, str], np.ndarray] = {}

  def embed(enc: str, fmt: str) -> np.ndarray:
    if (enc, fmt) not in encoders:
      raise convert.ExportError(f"{name}: format {fmt!r} is named for re-eval or the index but was "
                                "not exported")
    if (enc, fmt) not in embedded:
      embedded[(enc, fmt)] = encoders[(enc, fmt)](test_images if enc == "image" else test.texts)
    return embedded[(enc, fmt)]

  retrieval = {f"student_{fmt}": evaluate.recall_metrics(embed("image", fmt), embed("text", fmt))
               for fmt in ecfg.reeval}
  failed += _check_retrieval(ecfg, retrieval, int(test.num_images), len(test.texts))
  # The gallery index: the test images, embedded by the index's image encoder.
  idx_files = {}
  if ecfg.index_formats:
    zimg = embed("image", ecfg.index_encoder)
    zimg = zimg / np.linalg.norm(zimg, axis=1, keepdims=True)
  for dtype in ecfg.index_formats:
    ix = index.Index.build(zimg, dtype)
    path = os.path.join(out, f"gallery_{dtype}.idx")
    ix.save(path)
    idx_files[os.path.basename(path)] = {"bytes": os.path.getsize(path), "count": len(ix)}
  _write_meta(out, config, ecfg, test, tok)

  record = {"seconds": time.time() - t0, "steps": 0, "params": 0, "retrieval": retrieval,
            "export": files, "index": idx_files}
  _write_report(os.path.join(out, "report.md"), record, ecfg, failed, readiness)
  if failed:
    raise convert.ExportError("export parity below the floor (see " + os.path.join(out, "report.md")
                              + "):\n  " + "\n  ".join(failed))
  return record


def _write_meta(out: str, config, ecfg, test, tok) -> None:
  """What the search CLI needs besides the files: sizes, the student's tokenizer (spec and
  length), gallery source, a caption per image."""
  meta = {"image_size": config.data.image_size, "text_len": tok.max_len, "tokenizer": tok.spec,
          "tfds_name": config.data.tfds_name, "data_dir": config.data.data_dir,
          "split": config.data.test_split, "gallery_size": int(test.num_images),
          "index_encoder": ecfg.index_encoder,
          "captions": [tok.decode(test.texts[i * 5]) for i in range(test.num_images)]}
  fileio.write_json(os.path.join(out, "meta.json"), meta, indent=None)


def _write_report(path: str, record: dict, ecfg, failed: list[str], readiness: dict) -> None:
  lines = ["# Export report", "",
           f"Source stage `{ecfg.source}`, static batch {ecfg.batch_size}. Parity: "
           f"{ecfg.parity_examples} held-out test examples per encoder vs JAX; floors: min cosine "
           f"{ecfg.float_cosine_min} (float), {ecfg.quant_cosine_min} (quantized; int8 recipe "
           f"`{ecfg.int8_recipe}`), R@1 at most {ecfg.quant_r1_drop_max} below fp32; npu files: min "
           f"cosine {ecfg.get('npu_cosine_min')}, R@1 at most {ecfg.get('npu_r1_drop_max')} below fp32 "
           f"(npu_per_tensor: {ecfg.get('npu_per_tensor_cosine_min')}, "
           f"{ecfg.get('npu_per_tensor_r1_drop_max')}).", "",
           "| file | bytes | cosine min | cosine mean | max abs err | ops |", "|---|---|---|---|---|---|"]
  for f, r in record["export"].items():
    lines.append(f"| {f} | {r['bytes']:,} | {r['cosine_min']:.5f} | {r['cosine_mean']:.5f} | "
                 f"{r['max_abs_err']:.2e} | {len(r['ops'])} |")
  if record["retrieval"]:
    cols = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    lines += ["", "Retrieval on the test split with the exported encoders:", "",
              "| encoders | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, m in record["retrieval"].items():
      lines.append(f"| {row} | " + " | ".join(f"{m[c]:.1f}" for c in cols) + " |")
  lines += ["", "Ops per file:", ""]
  for f, r in record["export"].items():
    lines.append(f"- `{f}`: {', '.join(r['ops'])}")
  lines += ["", "NPU readiness (export/npu.py: integer activations end to end, builtin ops, static "
            "shapes; every op in `npu_readiness.json`):", "",
            "| file | NPU-ready | float activations | weights | static shapes | input | output |",
            "|---|---|---|---|---|---|---|"]
  for f, r in readiness.items():
    lines.append(f"| {f} | {'yes' if r['ready'] else 'no'} | {len(r['float_activations'])} | "
                 f"{npu.granularity(r)} | {'yes' if r['static_shapes'] else 'no'} | "
                 f"{','.join(r['io']['input'])} | {','.join(r['io']['output'])} |")
  for f, r in readiness.items():
    if FORMATS.get(record["export"][f]["format"], {}).get("npu") or not r["ready"]:
      lines += ["", f"`{f}`, activation ops (count, input types -> output types):", ""]
      lines += [f"- {op} x{n}: {i} -> {o}" for op, n, i, o in npu.op_table(r)]
      if r["float_activations"]:
        lines.append(f"- float activations: {', '.join(r['float_activations'][:8])}"
                     + (" ..." if len(r["float_activations"]) > 8 else ""))
  if record.get("index"):
    lines += ["", "Gallery index: " + ", ".join(f"`{f}` ({r['count']} x, {r['bytes']:,} bytes)"
                                                for f, r in record["index"].items())]
  if failed:
    lines += ["", "**FAILED**:", *[f"- {x}" for x in failed]]
  fileio.atomic_write(path, "\n".join(lines) + "\n")
