"""Post-training quantization of a float TFLite encoder with LiteRT's ai-edge-quantizer recipes.

The TF converter's full-int8 mode quantizes every activation per tensor to
8 bits with ranges fixed at calibration; on a small ViT that leaves a tail of
examples far from the float embedding (RESULTS.md, "int8 recipes").
ai-edge-quantizer works on the float .tflite file instead and lets a recipe
choose, per op, how weights and activations are stored. The recipes here:

  dynamic_w8  the export's default: per-channel int8 weights for every matmul and
              conv, whose int8 kernels quantize their input activations at run time
              (XNNPACK's dynamic-range int8 GEMMs, so each call gets its own range);
              the token-embedding table stored int8 (a static int8 GATHER_ND);
              element-wise ops (LayerNorm, softmax, GELU) stay float
  a8w8        static int8 activations, per-channel int8 weights, every op
  a16w8       static int16 activations, per-channel int8 weights, every op
  npu         static full-integer for NPU delegates: a8w8 (the `npu` export format)
  npu_per_tensor  the same with one scale per weight tensor, for delegates that refuse
              per-channel int8 weights

Static recipes take each activation's range as the min and max over every
calibration example (`ranges='min_max'`). The quantizer's own default is a
moving average of per-example extremes (weight 0.95 on the past), which fed one
example at a time remembers the last ~20 examples only: held-out inputs beyond
that range clip, in int16 as in int8. That was why a16w8 once scored below a8w8
(RESULTS.md, "NPU int8"); `ranges='moving_average'` keeps it for the ablation.
The losing recipes stay for the ablation (benchmarks/int8_recipes.py,
benchmarks/npu_recipes.py).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

_W8 = {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"}
# Static (calibrated) recipes: this many calibration examples at most. The calibrator runs the
# interpreter op by op in Python, ~1000x slower than the converter's; ranges settle well before.
MAX_CALIBRATION = 200


def _static(act_bits: int, op: str = "*", regex: str = ".*", weights: dict = _W8) -> dict:
  return {"regex": regex, "operation": op, "algorithm_key": "min_max_uniform_quantize",
          "op_config": {
              # LiteRT's int16 kernels are symmetric; its int8 ones take a zero point.
              "activation_tensor_config": {"num_bits": act_bits, "symmetric": act_bits == 16,
                                           "granularity": "TENSORWISE", "dtype": "INT"},
              "weight_tensor_config": weights, "compute_precision": "INTEGER",
              "explicit_dequantize": False, "skip_checks": False, "min_weight_elements": 0}}


def _dynamic(op: str = "*", regex: str = ".*") -> dict:
  return {"regex": regex, "operation": op, "algorithm_key": "min_max_uniform_quantize",
          "op_config": {"weight_tensor_config": _W8, "compute_precision": "INTEGER",
                        "explicit_dequantize": False, "skip_checks": False, "min_weight_elements": 0}}


RECIPES: dict[str, list[dict]] = {
    # Only ops with weights: a constant matrix on a BATCH_MATMUL's left (pool='moments') gets
    # an int8/float operand pair that LiteRT's kernel refuses.
    "dynamic_w8": [_dynamic("FULLY_CONNECTED"), _dynamic("CONV_2D"), _dynamic("DEPTHWISE_CONV_2D"),
                   _static(8, "GATHER_ND")],
    "a8w8": [_static(8)],
    "a16w8": [_static(16)],
    "npu": [_static(8)],
    "npu_per_tensor": [_static(8, weights={**_W8, "granularity": "TENSORWISE"})],
}
RANGES = ("min_max", "moving_average")


def _signature(buf: bytes) -> tuple[str, str]:
  """(signature key, input name) of a one-signature, one-input TFLite model."""
  from ai_edge_litert.interpreter import Interpreter

  sigs = Interpreter(model_content=buf).get_signature_list()
  if len(sigs) != 1:
    raise ValueError(f"expected one signature, found {sorted(sigs)}")
  key, io = next(iter(sigs.items()))
  if len(io["inputs"]) != 1:
    raise ValueError(f"signature {key!r} has inputs {io['inputs']}; expected one")
  return key, io["inputs"][0]


def calibrate(float_tflite: bytes, calibration: np.ndarray, recipe: list[dict],
              ranges: str = "min_max") -> dict:
  """Activation ranges ({tensor name: {'min', 'max'}}) of `float_tflite` over `calibration`.

  The quantizer's calibrator with `ranges`' update rule (see the module docstring).
  """
  from ai_edge_quantizer import calibrator, recipe_manager
  from ai_edge_quantizer.utils import qsv_utils

  if ranges not in RANGES:
    raise ValueError(f"unknown range rule {ranges!r}; known {RANGES}")
  update = qsv_utils.min_max_update if ranges == "min_max" else qsv_utils.moving_average_update
  key, name = _signature(float_tflite)
  rm = recipe_manager.RecipeManager()
  rm.load_quantization_recipe(recipe)
  calib = calibrator.Calibrator(bytes(float_tflite), num_threads=1, qsv_update_func=update)
  calib.calibrate({key: [{name: x[None]} for x in calibration[:MAX_CALIBRATION]]}, rm)
  return calib.get_model_qsvs()


def quantize(float_tflite: bytes, calibration: np.ndarray, recipe: str | list[dict],
             ranges: str = "min_max") -> bytes:
  """Quantizes a float .tflite encoder with `recipe` (a name in RECIPES, or recipe entries).

  Args:
    float_tflite: the fp32 flatbuffer (one signature, one input, static batch).
    calibration: training inputs [N, ...] in the model's input dtype; fed one example at a time
      (the graph's batch is static) to collect activation ranges.
    recipe: a RECIPES name or a list of ai-edge-quantizer recipe entries.
    ranges: how static activation ranges combine over examples: 'min_max' or the quantizer's
      default 'moving_average' (see the module docstring).

  Returns:
    The quantized flatbuffer.
  """
  from ai_edge_quantizer import quantizer

  if isinstance(recipe, str):
    if recipe not in RECIPES:
      raise ValueError(f"unknown quantization recipe {recipe!r}; known {tuple(RECIPES)}")
    recipe = RECIPES[recipe]
  from export import runtime

  # Entries for ops the model lacks are dropped: a static entry would start a calibration pass.
  ops = set(runtime.tflite_ops(float_tflite))
  recipe = [r for r in recipe if r["operation"] == "*" or r["operation"] in ops]
  qt = quantizer.Quantizer(bytearray(float_tflite), recipe)
  calib = calibrate(float_tflite, calibration, recipe, ranges) if qt.need_calibration else None
  result = qt.quantize(calib, enable_progress_report=False)
  model = result.quantized_model
  if model is None:  # Some versions only serialize to disk.
    with tempfile.TemporaryDirectory() as tmp:
      result.save(tmp, "m")
      with open(os.path.join(tmp, "m.tflite"), "rb") as f:
        return f.read()
  return bytes(model)
