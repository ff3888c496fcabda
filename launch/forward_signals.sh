# Sourced by launch/torchrun.sh and launch/deepspeed.sh: run a launcher so that stop signals
# reach the ranks. torchrun and DeepSpeed's runner die of SIGUSR1 (massl's preemption signal),
# DeepSpeed's runner of SIGTERM too, and the launchers' own SIGTERM handlers kill the ranks after
# a grace period (30 s in DeepSpeed's launcher): the ranks must get the signal themselves.
# - SIGTERM, SIGUSR1 and SIGINT sent to this script are forwarded to every massl rank the
#   launcher started on this node (and to nothing else of the run); the ranks checkpoint at an
#   agreed step and exit 75.
# - When the launcher ends, by a signal or otherwise, ranks of this node still running get
#   SIGTERM (they stop the same way) and the script waits until every process the launcher
#   started is gone. DeepSpeed's runner starts a launcher process that outlives it; a rank whose
#   own parent dies gets SIGTERM from Linux (massl sets a parent-death signal).
# The script ends with the launcher's status. The run's processes are those whose environment
# holds this script's MASSL_LAUNCH_ID: it needs no process tree (reparented orphans included).
#   run_forwarding_signals COMMAND [ARG ...]

# The processes of the run (rank processes only with "ranks"): one grep over /proc.
massl_run_processes() {
  local file pid
  for file in $(grep -lsxz "MASSL_LAUNCH_ID=$massl_launch_id" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${file#/proc/}
    pid=${pid%/environ}
    # A rank: the interpreter running massl (`python [-u] -m massl.cli`, or launch/massl_train.py
    # under srun); not a launcher, whose arguments name massl.cli too.
    if [ "${1:-}" != ranks ] || tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \
        | grep -qE '^[^ ]+ (-[a-zA-Z]+ )*(-m massl\.cli|[^ ]*massl_train\.py) '; then
      echo "$pid"
    fi
  done
}

massl_forward() {
  local pid
  for pid in $(massl_run_processes ranks); do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

run_forwarding_signals() {
  massl_launch_id="$$.$(date +%s%N).$RANDOM"
  MASSL_LAUNCH_ID=$massl_launch_id "$@" &
  local launcher=$! status=0
  trap 'massl_forward TERM' TERM
  trap 'massl_forward USR1' USR1
  trap 'massl_forward INT' INT
  wait "$launcher" || status=$?
  while [ "$status" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; do  # a trapped signal ended the wait
    status=0
    wait "$launcher" || status=$?
  done
  if [ -n "$(massl_run_processes ranks)" ]; then
    echo "massl: the launcher ended (status $status) while ranks still run: stopping them (SIGTERM)" >&2
    massl_forward TERM
  fi
  while [ -n "$(massl_run_processes)" ]; do
    sleep 0.5 &
    wait $! || true  # a forwarded signal interrupts the wait, not the loop
  done
  return "$status"
}
