# Sourced by scripts/slurm_cluster.sh and scripts/test_cluster.sh: what both test clusters share,
# the slurm.conf lines (no cgroups or accounting on a test machine, fast scheduling for quick
# requeues) and a wait for daemons to answer.
#   slurm_test_settings STATE_DIR   prints them; the job completion log goes to STATE_DIR/log
slurm_test_settings() {
  cat <<EOF_SETTINGS
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$1/log/jobcomp.log
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
EOF_SETTINGS
}

# Wait up to $1 seconds for the command that follows to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
