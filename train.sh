#!/usr/bin/env bash
# Usage: bash train.sh NUM_GPUS CONFIG [overrides ...]
#   bash train.sh 8 im256_w2.yaml network.do_scale_param=false
#   bash train.sh 1 tiny                      # the embedded CPU run
# One process per GPU through torchrun on a free random port (gloo on CPU, NCCL on GPU).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash train.sh NUM_GPUS CONFIG [overrides ...]" >&2
  exit 2
fi
NGPUS=$1
CONFIG=${2%.yaml}
shift 2
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()')
# No cd: relative paths in the overrides (dataset.path, outputdir) stay relative to the caller.
exec torchrun --nnodes=1 --nproc_per_node="$NGPUS" --master_port="$PORT" "$(dirname "$0")/train.py" \
  --config-name="$CONFIG" "$@"
