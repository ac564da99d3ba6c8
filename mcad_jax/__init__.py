"""mcad_jax: multi-teacher distillation of image-text retrieval models into small dual encoders.

The package imports without TensorFlow; TFDS builders load lazily and export/
lives outside it.
"""

__version__ = "0.1.0"
