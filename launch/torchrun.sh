#!/usr/bin/env bash
# Launch massl-train with torchrun.
#   launch/torchrun.sh NPROC_PER_NODE CONFIG [key=value ...]
# Multi-node: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's
# address) and MASTER_PORT set, e.g. NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh 8 cfg.yaml
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC_PER_NODE CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1 config=$2
shift 2
PYTHON=${PYTHON:-python}
# shellcheck source=launch/forward_signals.sh
source "$(dirname "$0")/forward_signals.sh"  # stop signals reach the ranks
run_forwarding_signals "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$nproc" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m massl.cli --config "$config" "$@"
