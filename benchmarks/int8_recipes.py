"""int8 recipes for a trained student's encoders: parity with JAX, retrieval and latency per recipe.

  python -m benchmarks.int8_recipes --workdir workdirs/demo [--recipes tf_int8 a8w8 a16w8] [--write]

Quantizes the float TFLite encoders of a finished export stage (W/export/
student_{image,text}_fp32.tflite) with each recipe of `export/quantize.py`
(LiteRT's ai-edge-quantizer), and also converts the TF converter's full-int8
file (`tf_int8`, the export's old int8), all calibrated on the same 1000
training examples. For each: min and mean cosine to JAX on the export's 256
held-out test examples, R@1 both ways on the whole test set against the JAX
student, file size and 1-thread LiteRT latency. With --write the table goes
into RESULTS.md (section "int8 recipes").
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from benchmarks.report import median_ms


def main():
  from export import quantize

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--recipes", nargs="+", default=["tf_int8", *quantize.RECIPES])
  ap.add_argument("--calib", type=int, default=1000)
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--section", default="int8_recipes")
  args = ap.parse_args()

  from export import convert, runtime, stage
  from export.__main__ import load_run_config
  from mcad_jax import evaluate

  config = load_run_config(args.workdir)
  src = config.export.source if "export" in config else "distill"
  model, params = stage.load_student(config, args.workdir, src)
  fns = convert.encoder_fns(model, params)
  test = stage._test_data(config, config.data.eval_limit or None)
  images = test.images.astype(np.float32)
  held = {"image": images[:256], "text": test.texts[:256]}
  ref = {k: np.asarray(jax.jit(fns[k])(held[k])) for k in held}
  full_ref = {"image": np.asarray(jax.jit(fns["image"])(images)),
              "text": np.asarray(jax.jit(fns["text"])(test.texts))}
  base = evaluate.recall_metrics(full_ref["image"], full_ref["text"])
  calib = stage.calibration_data(config, args.calib)
  out = os.path.join(args.workdir, "export")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    sm = None
    for name in args.recipes:
      row, emb = {"recipe": name}, {}
      for enc in ("image", "text"):
        fp32 = os.path.join(out, f"student_{enc}_fp32.tflite")
        if name == "tf_int8":
          if sm is None:
            sm = convert.save_savedmodel(fns, convert.input_specs(
                config.data.image_size, config.data.text_len, 1), os.path.join(tmp, "sm"), False)
          buf = convert.to_tflite(sm, enc, "int8", stage.representative(calib[enc]))
        else:
          buf = quantize.quantize(open(fp32, "rb").read(), calib[enc], name)
        path = os.path.join(tmp, f"{enc}_{name}.tflite")
        with open(path, "wb") as f:
          f.write(buf)
        e = runtime.TFLiteEncoder(path)
        p = stage.parity(ref[enc], e(held[enc]))
        emb[enc] = e(images if enc == "image" else test.texts)
        x = held[enc][:1]
        row[enc] = {**p, "bytes": len(buf), "ms": median_ms(lambda e=e, x=x: e(x), args.reps, 3)}
      m = evaluate.recall_metrics(emb["image"], emb["text"])
      row["di2t"], row["dt2i"] = m["i2t_r1"] - base["i2t_r1"], m["t2i_r1"] - base["t2i_r1"]
      rows.append(row)
      print(row, flush=True)
  lines = [f"`python -m benchmarks.int8_recipes --workdir {args.workdir} --write`: each recipe vs JAX "
           f"on 256 held-out test examples (cosine), R@1 change vs the JAX student on the whole test "
           f"set (JAX: i2t {base['i2t_r1']:.1f}, t2i {base['t2i_r1']:.1f}), size, and LiteRT "
           "latency at 1 thread (median, batch 1), calibrated on the same "
           f"{args.calib} training examples.",
           "",
           "| recipe | image min cos | image mean cos | text min cos | text mean cos | ΔR@1 i2t | "
           "ΔR@1 t2i | image KB | text KB | image ms | text ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    i, t = r["image"], r["text"]
    lines.append(f"| {r['recipe']} | {i['cosine_min']:.4f} | {i['cosine_mean']:.4f} | "
                 f"{t['cosine_min']:.4f} | {t['cosine_mean']:.4f} | {r['di2t']:+.1f} | {r['dt2i']:+.1f} | "
                 f"{i['bytes'] / 1e3:.0f} | {t['bytes'] / 1e3:.0f} | {i['ms']:.2f} | {t['ms']:.2f} |")
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("RESULTS.md", args.section, "int8 recipes", lines)


if __name__ == "__main__":
  main()
