# Sourced by launch/torchrun.sh and launch/deepspeed.sh: run a launcher so that stop signals
# reach the ranks. torchrun and DeepSpeed's runner die of SIGUSR1 (massl's preemption signal),
# and their ranks run in their own sessions, out of reach of a signal to the launcher's group:
# SIGTERM, SIGUSR1 and SIGINT sent to this script are forwarded to every massl process under
# the launcher (the ranks: they checkpoint at an agreed step and exit 75), and the script ends
# with the launcher's status. A rank whose launcher dies anyway gets SIGTERM (massl sets a
# parent-death signal) and stops the same way.
#   run_forwarding_signals COMMAND [ARG ...]
massl_descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    massl_descendants "$child"
  done
}

massl_forward() {
  local pid
  for pid in $(massl_descendants "$massl_launcher"); do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qE 'massl\.cli|massl_train\.py'; then
      kill -s "$1" "$pid" 2>/dev/null || true
    fi
  done
}

run_forwarding_signals() {
  "$@" &
  massl_launcher=$!
  trap 'massl_forward TERM' TERM
  trap 'massl_forward USR1' USR1
  trap 'massl_forward INT' INT
  local status=0
  wait "$massl_launcher" || status=$?
  while [ "$status" -gt 128 ] && kill -0 "$massl_launcher" 2>/dev/null; do  # a trapped signal ended the wait
    status=0
    wait "$massl_launcher" || status=$?
  done
  return "$status"
}
