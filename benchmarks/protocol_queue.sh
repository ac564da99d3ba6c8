#!/usr/bin/env bash
# Starts the protocol's queue (benchmarks/protocol.py) in the background: WORKERS processes at
# nice 10, each with its log in OUT. Run it again after any stop: finished runs are skipped and a
# cut-off run resumes from its last checkpoint.
#
#   bash benchmarks/protocol_queue.sh [OUT] [WORKERS] [protocol.py run flags, e.g. --data_source generate]
#   tail -f OUT/worker*.log
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/protocol}
WORKERS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for ((i = 0; i < WORKERS; i++)); do
  nohup nice -n 10 "$PY" -m benchmarks.protocol run --out "$OUT" --workers "$WORKERS" --worker "$i" "$@" \
    >> "$OUT/worker$i.log" 2>&1 &
  echo "worker $i: pid $! (log $OUT/worker$i.log)"
done
