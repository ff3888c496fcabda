# Sourced by scripts/slurm_cluster.sh and scripts/test_cluster.sh: the slurm.conf lines both test
# clusters share (no cgroups or accounting on a test machine, fast scheduling for quick requeues).
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
