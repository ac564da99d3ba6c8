"""int8 parity of a trained student's encoders: LayerNorm variance form x calibration size.

  python -m benchmarks.int8_ablation --workdir workdirs/demo [--write]

Converts the student of a finished workdir to full-int8 TFLite four ways, with
the exported graph traced with one-pass or two-pass LayerNorm variance
(mcad_jax/models/layers.py) and calibrated on 200 or 1000 training examples,
and compares each with JAX on the export's 256 held-out test examples (min and
mean cosine). The shipped export uses two-pass variance and 1000 examples.
With --write the table goes into RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import jax
import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()

  from export import convert, runtime, stage
  from export.__main__ import load_run_config
  from mcad_jax.models import layers

  config = load_run_config(args.workdir)
  model, params = stage.load_student(config, args.workdir, "distill")
  tok = stage.student_tokenizer(config, "distill")
  specs = convert.input_specs(config.data.image_size, tok.max_len, 1)
  test = stage._test_data(config, 256, tok)
  held = {"image": test.images.astype(np.float32), "text": test.texts[:256]}
  calib = stage.calibration_data(config, 1000, tok)
  rows = []
  for two_pass in (False, True):
    fns = convert.encoder_fns(model, params, layers.two_pass_layer_norm if two_pass
                              else contextlib.nullcontext)
    ref = {k: np.asarray(jax.jit(fns[k])(held[k])) for k in held}
    with tempfile.TemporaryDirectory() as tmp:
      sm = convert.save_savedmodel(fns, specs, os.path.join(tmp, "sm"), uint8_image=False)
      for n in (200, 1000):
        row = [("two-pass" if two_pass else "one-pass"), n]
        for enc in ("image", "text"):
          path = os.path.join(tmp, f"{enc}.tflite")
          with open(path, "wb") as f:
            f.write(convert.to_tflite(sm, enc, "int8", stage.representative(calib[enc][:n])))
          p = stage.parity(ref[enc], runtime.TFLiteEncoder(path)(held[enc]))
          row += [p["cosine_min"], p["cosine_mean"]]
        rows.append(row)
  lines = [f"`python -m benchmarks.int8_ablation --workdir {args.workdir} --write`: full-int8 TFLite vs "
           "JAX on 256 held-out test examples, the student of that workdir.",
           "",
           "| LayerNorm variance in the graph | calibration examples | image min cos | image mean cos "
           "| text min cos | text mean cos |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r[0]} | {r[1]} | " + " | ".join(f"{x:.4f}" for x in r[2:]) + " |" for r in rows]
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("RESULTS.md", "int8_ablation", "int8 ablation", lines)


if __name__ == "__main__":
  main()
