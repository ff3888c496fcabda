#!/usr/bin/env bash
# A private single-node Slurm cluster, everything under one directory (for tests and local trials).
#   scripts/slurm_cluster.sh start DIR   # prints "export SLURM_CONF=DIR/slurm.conf"
#   KILL_WAIT=5 scripts/slurm_cluster.sh start DIR   # KillWait (default 30 s, Slurm's default)
#   scripts/slurm_cluster.sh stop DIR    # cancels the jobs, shuts the daemons down, ends munged
# Needs slurmctld, slurmd, munged (Debian: apt-get install slurm-wlm munge) and root: the daemons
# run as root with a private munge key and socket, no systemd, no cgroups. Installs nothing.
set -euo pipefail
# shellcheck source=scripts/slurm_conf_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_conf_common.sh"

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
sock=$dir/munge/munge.socket
export SLURM_CONF=$conf

die() { echo "slurm_cluster: $*" >&2; exit 1; }

# A free port below the kernel's ephemeral range: a port from that range can be handed to another
# process's outgoing connection before the daemon binds it.
free_port() { python3 "$(dirname "${BASH_SOURCE[0]}")/../massl/testing/ports.py"; }

munge_ok() { munge -S "$sock" -n | unmunge -S "$sock"; }
node_idle() { [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; }
no_jobs() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
pids_gone() { local f; for f in "$@"; do ! pid_alive "$f" || return 1; done; }

start() {
  local cmd
  for cmd in slurmctld slurmd munged mungekey munge unmunge sinfo scontrol python3; do
    command -v "$cmd" >/dev/null || die "$cmd not found; install Slurm and munge (Debian: apt-get install -y slurm-wlm munge)"
  done
  [ "$(id -u)" = 0 ] || die "run as root (the daemons run as SlurmUser=root)"
  [ ${#sock} -lt 100 ] || die "DIR is too long for a unix socket path: $sock"
  ! pid_alive "$dir/slurmctld.pid" || die "a cluster is already running in $dir; stop it first"
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  chmod 700 "$dir/munge"

  rm -f "$dir/munge/munge.key"
  mungekey --create --keyfile="$dir/munge/munge.key"
  chmod 600 "$dir/munge/munge.key"
  munged --force --socket="$sock" --key-file="$dir/munge/munge.key" --log-file="$dir/log/munged.log" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"
  wait_for 10 munge_ok || die "munged did not answer on $sock; see $dir/log/munged.log"

  local host node mem
  host=$(hostname -s)
  # "NodeName=h CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=M"
  node=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$node")
  # Own ports, so that this cluster neither needs nor disturbs the standard ones.
  cat >"$conf" <<EOF
ClusterName=massl-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job restarts after this many seconds (default 120)
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
$(slurm_test_settings "$dir")
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or timed out
KillWait=${KILL_WAIT:-30}
NodeName=$host NodeAddr=127.0.0.1 $node RealMemory=$((mem * 9 / 10))
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -f "$conf"
  slurmd -f "$conf" -N "$host"
  wait_for 30 node_idle || die "node not idle after 30 s ($(sinfo -h -o %T 2>&1)); see $dir/log/"
  echo "export SLURM_CONF=$conf"
}

stop() {
  if [ -f "$conf" ] && pid_alive "$dir/slurmctld.pid"; then
    scancel --full --quiet "$(squeue -h -o %i | paste -sd, -)" 2>/dev/null || true
    # Jobs get KillWait seconds after SIGTERM; slurmstepd outlives slurmd, so wait for them first.
    wait_for 40 no_jobs || echo "slurm_cluster: jobs still listed after 40 s: $(squeue -h -o '%i %T' | paste -sd' ')" >&2
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  wait_for 15 pids_gone "$dir/slurmctld.pid" "$dir/slurmd.pid" || true
  local f
  for f in "$dir/slurmctld.pid" "$dir/slurmd.pid" "$dir/munge/munged.pid"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")"
      wait_for 5 pids_gone "$f" || kill -9 "$(cat "$f")" 2>/dev/null || true
    fi
  done
  rm -f "$dir/munge/munge.socket" "$dir/munge/munge.socket.lock"
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
