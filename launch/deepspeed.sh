#!/usr/bin/env bash
# Launch massl-train with DeepSpeed's launcher (engine.name=deepspeed).
#   launch/deepspeed.sh HOSTFILE CONFIG [key=value ...]
# HOSTFILE lists the nodes, one "hostname slots=N" line each (launch/hostfile.example); the first
# node runs rank 0. The launcher reaches the other nodes over passwordless ssh (pdsh), or set
# DS_LAUNCHER_ARGS, e.g. "--launcher openmpi" (mpirun) or "--launcher slurm" (srun, inside an
# allocation), "--master_port 29600", "--include host1:0,1"; quotes keep a value with spaces whole
# ('--launcher openmpi --launcher_args "--mca btl_tcp_if_include ib0"'). With a single host in HOSTFILE the run
# is local: no ssh, rendezvous at 127.0.0.1. With "--launcher slurm", run it inside an allocation of
# the hostfile's nodes (salloc); the ranks meet at the first node of srun's step (no MASTER_ADDR is
# passed), and srun ends every rank once one fails (SLURM_KILL_BAD_EXIT=1 unless already set).
# Ranks and the rendezvous address: docs/multinode.md.
# Environment on every node: DeepSpeed's runners pass on only PYTHON*, NCCL* (GPUs) and the KEY=VAL
# lines of ~/.deepspeed_env and ./.deepspeed_env. This script adds MASSL_*, OMP_NUM_THREADS, GLOO_*,
# NCCL_*, PATH, the variables named in MASSL_EXPORT (e.g. MASSL_EXPORT="HF_HOME WANDB_API_KEY") and, for
# mpirun, MASTER_ADDR/PORT (the first host of HOSTFILE), through a private copy of those files.
# DeepSpeed's own options (bucket sizes, overlap, ...) go into a JSON file: engine.deepspeed_config=ds.json
# (configs/deepspeed/zero{1,2,3}.json); massl sets the batch, optimiser, schedules, clipping and precision.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
hostfile=$1 config=$2
shift 2
[ -f "$hostfile" ] || { echo "error: hostfile $hostfile not found (one \"hostname slots=N\" line per node)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
# DS_LAUNCHER_ARGS split as a shell splits words (quotes keep a value with spaces in one argument:
# --launcher_args "--mca btl_tcp_if_include ib0"), without evaluating it.
if ! words=$(printf '%s' "${DS_LAUNCHER_ARGS:-}" | xargs -r printf '%s\n' 2>&1); then
  echo "error: DS_LAUNCHER_ARGS cannot be split into arguments (an unmatched quote?): ${DS_LAUNCHER_ARGS:-}" >&2
  exit 2
fi
ds_args=()
if [ -n "$words" ]; then mapfile -t ds_args <<<"$words"; fi
# The value of launcher flag $1 in DS_LAUNCHER_ARGS ("--flag v" or "--flag=v"), else $2.
ds_flag() {
  local i
  for ((i = 0; i < ${#ds_args[@]}; i++)); do
    case ${ds_args[i]} in
      "$1") echo "${ds_args[i + 1]:-}"; return ;;
      "$1"=*) echo "${ds_args[i]#*=}"; return ;;
    esac
  done
  echo "$2"
}
hosts=($(sed -e 's/#.*//' "$hostfile" | awk 'NF { print $1 }'))
[ ${#hosts[@]} -ge 1 ] || { echo "error: hostfile $hostfile lists no host (one \"hostname slots=N\" line per node)" >&2; exit 2; }
launcher=$(ds_flag --launcher pdsh)
launcher=${launcher,,}
master_port=$(ds_flag --master_port 29500)

if [ ${#hosts[@]} = 1 ] && [ -z "$(ds_flag --master_addr '')" ] && [ "$(ds_flag --force_multi no)" = no ]; then
  # One host: DeepSpeed starts the ranks here, yet would first ssh to the host (to check, and to
  # ask for its address): skip both.
  ds_args+=(--no_ssh_check --master_addr 127.0.0.1)
fi

# The environment every rank gets, as KEY=VAL lines in a private DS_ENV_FILE (absolute: DeepSpeed
# then reads it instead of ~/.deepspeed_env and ./.deepspeed_env, whose lines come first).
env_file=$(mktemp "${TMPDIR:-/tmp}/massl-deepspeed-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
  if [ -f "$f" ]; then grep -v '^[[:space:]]*$' "$f" >>"$env_file" || true; fi
done
for var in $(compgen -e); do
  case $var in
    # PATH: the tools of this environment on every node (e.g. the venv's ninja, which builds
    # DeepSpeed's extensions; another ninja rebuilds them from scratch).
    MASSL_*|OMP_NUM_THREADS|GLOO_*|NCCL_*|PATH) echo "$var=${!var}" >>"$env_file" ;;
  esac
done
for var in ${MASSL_EXPORT:-}; do
  if [ -n "${!var+set}" ]; then echo "$var=${!var}" >>"$env_file"; fi
done
if [ "$launcher" = openmpi ]; then
  # mpirun gives the ranks no rendezvous address: rank 0 runs on the hostfile's first host.
  echo "MASTER_ADDR=$(ds_flag --master_addr "${hosts[0]}")" >>"$env_file"
fi
if [ "$launcher" = openmpi ] || [ "$launcher" = slurm ]; then
  # Neither runner passes --master_port on (massl's ranks would take 29500 whatever it says).
  echo "MASTER_PORT=$master_port" >>"$env_file"
fi
# Slurm's runner starts a script path, never a module (srun python -u SCRIPT); the others, the module.
target=(--module massl.cli)
if [ "$launcher" = slurm ]; then
  target=("$here/massl_train.py")
  # srun ends every rank once one fails (as train.sbatch's srun does): no rank left waiting alone
  # for a peer that is gone (srun -K, unless SLURM_KILL_BAD_EXIT says otherwise).
  export SLURM_KILL_BAD_EXIT=${SLURM_KILL_BAD_EXIT:-1}
fi
export DS_ENV_FILE=$env_file
# shellcheck source=launch/forward_signals.sh
source "$here/forward_signals.sh"  # stop signals reach the ranks of this node
run_forwarding_signals "${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" "${ds_args[@]}" \
  "${target[@]}" --config "$config" engine.name=deepspeed "$@"
