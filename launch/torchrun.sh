#!/usr/bin/env bash
# Launch massl-train with torchrun.
#   launch/torchrun.sh NPROC_PER_NODE CONFIG [key=value ...]
# Multi-node: run the same command on every node with NNODES and MASTER_ADDR (a host every node
# reaches, usually the first node; its agent hosts the c10d rendezvous on MASTER_PORT), e.g.
#   NNODES=2 MASTER_ADDR=node1 launch/torchrun.sh 8 cfg.yaml
# The nodes' ranks are assigned as they join (RDZV_ID names the job: one id per run if several share
# a host and port). docs/multinode.md.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC_PER_NODE CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1 config=$2
shift 2
PYTHON=${PYTHON:-python}
if [ "${NNODES:-1}" = 1 ]; then
  nodes=(--nnodes=1 --node-rank=0 --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}")
else
  if [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR, the host of the rendezvous (e.g. the first node), set on every node" >&2
    exit 2
  fi
  nodes=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
         --rdzv-id="${RDZV_ID:-massl}")
fi
# shellcheck source=launch/forward_signals.sh
source "$(dirname "$0")/forward_signals.sh"  # stop signals reach the ranks
run_forwarding_signals "$PYTHON" -m torch.distributed.run "${nodes[@]}" --nproc-per-node="$nproc" \
  -m massl.cli --config "$config" "$@"
