"""Importing the torch reference libraries (open_clip, transformers) next to CPU-only torch."""


def torchvision_on_cpu_torch():
  """Makes torchvision importable next to the CPU-only torch build.

  PyPI's torchvision wheel carries CUDA-built C++ ops that cannot load next to the CPU
  torch (libc10_cuda.so is missing), and its `_meta_registrations` module then fails
  registering fake kernels for those missing ops. open_clip and transformers import
  torchvision (transforms, a ResNet helper) but never call those ops; so that one module
  is skipped (an empty module in its place) and the rest of torchvision, open_clip and
  transformers stay real.
  """
  import sys
  import types

  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for k in [k for k in sys.modules if k.startswith("torchvision")]:
      del sys.modules[k]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  except ImportError:
    pass
