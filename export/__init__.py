"""Mobile export of a trained student: SavedModel, TFLite (fp32/fp16/dynamic/int8/npu), ONNX.

Outside the TF-free `mcad_jax` package: everything here needs TensorFlow (and
`jax2onnx` for ONNX). Entry points:

  python -m export --workdir W                # export stage on a finished workdir
  python -m export.search --workdir W "query"  # on-device style search with the .tflite encoders
"""
