#!/usr/bin/env bash
# Launch massl-train with DeepSpeed's launcher (engine.name=deepspeed).
#   launch/deepspeed.sh HOSTFILE CONFIG [key=value ...]
# HOSTFILE lists the nodes, one "hostname slots=N" line each (launch/hostfile.example); the
# launcher reaches the other nodes over passwordless ssh (pdsh), or set DS_LAUNCHER_ARGS, e.g.
#   DS_LAUNCHER_ARGS="--launcher openmpi" or "--launcher slurm" (ranks then come from the MPI or
#   Slurm variables, which massl reads), "--num_gpus 4", "--include host1:0,1", "--master_port 29600",
#   or on one node that cannot ssh to itself: "--no_ssh_check --master_addr 127.0.0.1".
# Each process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and --local_rank=N.
# DeepSpeed's own options (bucket sizes, overlap, ...) go into a JSON file: engine.deepspeed_config=ds.json
# (configs/deepspeed/zero{1,2,3}.json); massl sets the batch, optimiser, schedules, clipping and precision.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
hostfile=$1 config=$2
shift 2
# shellcheck source=launch/forward_signals.sh
source "$(dirname "$0")/forward_signals.sh"  # stop signals reach the ranks
# shellcheck disable=SC2086
run_forwarding_signals "${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" ${DS_LAUNCHER_ARGS:-} \
  --module massl.cli --config "$config" engine.name=deepspeed "$@"
