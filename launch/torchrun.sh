#!/usr/bin/env bash
# Launch massl-train with torchrun.
#   launch/torchrun.sh NPROC_PER_NODE CONFIG [key=value ...]
# Multi-node: run the same command on every node with NNODES and MASTER_ADDR (a host every node
# reaches, usually the first node; its agent hosts the c10d rendezvous on MASTER_PORT), e.g.
#   NNODES=2 MASTER_ADDR=node1 launch/torchrun.sh 8 cfg.yaml
# The nodes' ranks are assigned as they join (RDZV_ID names the job: one id per run if several share
# a host and port). docs/multinode.md.
# Exit status: 0 trained to the end, 75 every rank of this node stopped at a checkpoint after a stop
# signal (run the same command again to continue), other: failed (torchrun's status).
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
# Each rank that stops at a checkpoint after a stop signal leaves a file here (massl/signals.py).
marks=$(mktemp -d "${TMPDIR:-/tmp}/massl-stopped.XXXXXX")
trap 'rm -rf "$marks"' EXIT
status=0
MASSL_STOP_MARKS=$marks run_forwarding_signals "$PYTHON" -m torch.distributed.run "${nodes[@]}" \
  --nproc-per-node="$nproc" -m massl.cli --config "$config" "$@" || status=$?
# torchrun reports a rank's exit 75 as a failure (1), or dies of SIGUSR1 while its ranks stop: the
# script ends with 75, as massl-train and train.sbatch do, when every rank of this node stopped at
# the checkpoint; any other end keeps torchrun's status.
stopped=$(find "$marks" -type f | wc -l)
if [ "$status" != 0 ] && [ "$stopped" = "$nproc" ]; then
  echo "massl: all $nproc rank(s) of this node stopped at a checkpoint: exit 75 (torchrun's status: $status)" >&2
  status=75
fi
exit "$status"
