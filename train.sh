#!/usr/bin/env bash
# Usage: bash train.sh NUM_GPUS CONFIG [overrides ...]
#   bash train.sh 8 im256_w2.yaml network.do_scale_param=false
#   bash train.sh 1 tiny                      # the embedded CPU run
# One process per GPU through torchrun on a free random port (gloo on CPU, NCCL on GPU).
#
# Ctrl-C, SIGTERM, SIGUSR1 and SIGUSR2 sent to this script reach every worker once; the workers stop at
# the next step boundary with a checkpoint (a second Ctrl-C aborts them at once). When the run fails,
# the last line is its cause (`train.sh: error: ...`), whatever torchrun printed before it.
set -uo pipefail
usage() {
  echo "usage: bash train.sh NUM_GPUS CONFIG [overrides ...]" >&2
  echo "train.sh: error: $1" >&2
  exit 2
}
[ $# -ge 2 ] || usage "expected NUM_GPUS and CONFIG, got $# argument(s)"
NGPUS=$1
[[ $NGPUS =~ ^[1-9][0-9]*$ ]] || usage "NUM_GPUS must be a positive integer (processes on this machine), got '$NGPUS'"
CONFIG=${2%.yaml}
shift 2
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()') \
  || usage "python is not on the PATH (activate the environment first)"
TVM_ERROR_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tvm-train.XXXXXX") || exit 1
export TVM_ERROR_DIR  # each worker writes its one-line cause there (tvm/train/entry.py)
trap 'rm -rf "$TVM_ERROR_DIR"' EXIT

# torchrun runs in its own process group (job control on), so that a Ctrl-C at the terminal reaches
# this script only; the script hands each signal to the workers (torchrun's children) exactly once.
# Signalled itself, torchrun would send SIGINT/SIGTERM on and kill the workers 30 s later.
set -m
# No cd: relative paths in the overrides (dataset.path, outputdir) stay relative to the caller.
torchrun --nnodes=1 --nproc_per_node="$NGPUS" --master_port="$PORT" "$(dirname "$0")/train.py" \
  --config-name="$CONFIG" "$@" &
AGENT=$!
to_workers() {
  local workers
  workers=$(pgrep -P "$AGENT" 2>/dev/null | tr '\n' ' ')
  # shellcheck disable=SC2086  # one pid per word
  kill -s "$1" ${workers:-$AGENT} 2>/dev/null || true
}
for sig in INT TERM USR1 USR2; do
  trap "to_workers $sig" "$sig"
done
trap 'kill -s HUP "$AGENT" 2>/dev/null || true' HUP

rc=0
wait "$AGENT" || rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$AGENT" 2>/dev/null; do  # wait was interrupted by a signal
  rc=0
  wait "$AGENT" || rc=$?
done
if [ "$rc" -ne 0 ]; then
  cause=$(cat "$TVM_ERROR_DIR"/rank*.txt 2>/dev/null | head -n 1)
  echo "train.sh: torchrun exited with code $rc" >&2
  echo "${cause:-train.sh: error: no worker reported a cause; see the output above}" >&2
fi
exit "$rc"
