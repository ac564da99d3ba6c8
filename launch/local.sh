#!/usr/bin/env bash
# N local CPU processes, D fake devices each, one jax.distributed job: the multi-host code path
# on one machine. Every process runs the same command, as on a TPU pod.
#
#   launch/local.sh N [D] -- --config=configs/shapes.py:smoke --workdir=workdirs/mp
#
# Logs go to <workdir>/proc<i>.log; the script exits non-zero if any process fails.
set -euo pipefail
N=${1:?usage: launch/local.sh N [DEVICES_PER_PROCESS] -- MAIN_ARGS...}
shift
D=2
if [[ $# -gt 0 && $1 != "--" ]]; then D=$1; shift; fi
[[ $# -gt 0 && $1 == "--" ]] && shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[[ -x $PY ]] || PY=python3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
WORKDIR=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)
LOGDIR=${WORKDIR:-.}
mkdir -p "$LOGDIR"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    "$PY" -m mcad_jax.main "$@" >"$LOGDIR/proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGDIR/proc$i.log" >&2
    status=1
  fi
done
exit $status
