#!/usr/bin/env bash
# Usage: bash eval.sh NUM_GPUS CONFIG eval.resume=PATH [overrides ...]
#   bash eval.sh 8 im256_w2 eval.resume=outputs/im256_w2 eval.ref_stats=refs/img256.pkl
#   bash eval.sh 1 tiny eval.resume=outputs/tiny eval.num_images=1000
# One process per GPU through torchrun on a free random port; PATH is a checkpoint or a run
# directory (newest checkpoint first). Results: <checkpoint dir>/metrics-eval.jsonl.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash eval.sh NUM_GPUS CONFIG eval.resume=PATH [overrides ...]" >&2
  exit 2
fi
NGPUS=$1
CONFIG=${2%.yaml}
shift 2
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()')
# No cd: relative paths in the overrides stay relative to the caller's directory.
exec torchrun --nnodes=1 --nproc_per_node="$NGPUS" --master_port="$PORT" "$(dirname "$0")/eval.py" \
  --config-name="$CONFIG" "$@"
