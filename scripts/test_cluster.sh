#!/usr/bin/env bash
# A multi-node test cluster on one Linux machine, to try every launcher across hosts (and for the tests).
#   scripts/test_cluster.sh up N            # N >= 2 nodes; prints hostfile=PATH and one nodeK=ADDRESS line per node
#   scripts/test_cluster.sh exec nodeK CMD  # run CMD inside node K (current directory and environment kept)
#   scripts/test_cluster.sh kill nodeK      # SIGKILL every process of node K (a node that dies), node left up
#   scripts/test_cluster.sh down            # stop everything `up` started, remove the namespaces
# Each node is a network + UTS + mount namespace with its own address (a private /24 that exists
# only inside these namespaces, on a bridge in a namespace of its own: no traffic leaves them) and
# its own hostname node1..nodeN; the names resolve on every node (a private /etc/hosts), the file
# system is shared as on a cluster with NFS. Every node runs sshd with a root key made at `up`
# (inside the nodes ~root/.ssh is the cluster's own, so ssh, pdsh and mpirun need no setup and the
# machine's real ~/.ssh is untouched). With slurmctld, slurmd and munged installed, a real Slurm runs
# too: slurmctld on node1, one slurmd per node (`up` then prints slurm_conf=PATH; point SLURM_CONF at it).
# State lives in $MASSL_TEST_CLUSTER_DIR (default /tmp/massl-test-cluster); the subnet's first three
# octets in $MASSL_TEST_CLUSTER_NET (default 10.213.0). With MASSL_TEST_CLUSTER_OWNER=PID, `down`
# runs by itself once that process is gone (a crashed test leaves nothing running).
# Needs root, iproute2, util-linux (unshare, nsenter), openssh-server; Slurm needs slurm-wlm and munge
# (Debian: apt-get install -y openssh-server pdsh openmpi-bin slurm-wlm munge).
set -euo pipefail
# shellcheck source=scripts/slurm_conf_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_conf_common.sh"

dir=$(realpath -m "${MASSL_TEST_CLUSTER_DIR:-/tmp/massl-test-cluster}")
net=${MASSL_TEST_CLUSTER_NET:-10.213.0}
self=$(realpath "$0")
usage() { echo "usage: $0 up N | down | exec nodeK CMD... | kill nodeK" >&2; exit 2; }
die() { echo "test_cluster: $*" >&2; exit 1; }

holder() { cat "$dir/$1.pid" 2>/dev/null; }  # the process that keeps a namespace alive
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
nodes() { cat "$dir/nodes" 2>/dev/null || true; }
in_node() {  # in_node nodeK CMD...: CMD in node K's namespaces, in the current directory
  local pid
  pid=$(holder "$1")
  alive "$pid" || die "$1 is not up (scripts/test_cluster.sh up N)"
  shift
  exec nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
}

# The pids of every process inside node $1's network namespace, its holder included.
node_pids() {
  local pid ns p
  # The namespace noted at `up`: found even if the holder was killed (a signal to a process group).
  ns=$(cat "$dir/$1.netns" 2>/dev/null) || return 0
  [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/$$/ns/net)" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$ns" ] && echo "${p#/proc/}"
  done
  return 0
}

kill_node() {  # SIGKILL everything of node $1 except its holder (the node stays, as a rebooted host would)
  local pid p
  pid=$(holder "$1")
  for p in $(node_pids "$1"); do
    [ "$p" = "$pid" ] || kill -9 "$p" 2>/dev/null || true
  done
}

slurm_down() {
  local conf=$dir/slurm/slurm.conf
  [ -f "$conf" ] || return 0
  if alive "$(cat "$dir/slurm/slurmctld.pid" 2>/dev/null)"; then
    # Jobs first (their steps outlive slurmd), then the daemons.
    in_node_sh node1 "SLURM_CONF=$conf scancel --full --quiet \$(SLURM_CONF=$conf squeue -h -o %i | paste -sd, -) 2>/dev/null;
      SLURM_CONF=$conf scontrol shutdown >/dev/null 2>&1" || true
    wait_for 15 sh -c "! kill -0 \$(cat '$dir/slurm/slurmctld.pid') 2>/dev/null" || true
  fi
}

in_node_sh() {  # in_node_sh nodeK SCRIPT: a shell snippet inside node K (returns, unlike in_node)
  local pid
  pid=$(holder "$1")
  alive "$pid" || return 1
  nsenter -t "$pid" -n -u -m -- sh -c "$2"
}

down() {
  [ -d "$dir" ] || return 0
  slurm_down
  local k pid f
  # Everything inside the nodes (sshd, slurmd, ranks), then the holders: the namespaces go with them.
  for k in $(nodes) switch; do
    for pid in $(node_pids "$k"); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for f in "$dir"/slurm/munged.pid "$dir"/watchdog.pid; do
    pid=$(cat "$f" 2>/dev/null || true)
    if alive "$pid" && [ "$pid" != "$$" ] && [ "$pid" != "$PPID" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$dir"
}

up() {
  local n=$1 k cmd
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 200 ] || die "up N: N must be a number of nodes from 2 to 200, got '$n'"
  [ "$(id -u)" = 0 ] || die "run as root (namespaces, sshd)"
  for cmd in ip unshare nsenter ssh ssh-keygen /usr/sbin/sshd; do
    command -v "$cmd" >/dev/null || die "$cmd not found; install iproute2, util-linux and openssh-server"
  done
  [ ! -e "$dir" ] || die "$dir exists: a cluster is up (scripts/test_cluster.sh down first)"
  mkdir -p "$dir/ssh" "$dir/log"
  chmod 700 "$dir" "$dir/ssh"
  # A failure or an interrupt half-way leaves nothing behind.
  up_ok=0
  trap 'if [ "$up_ok" = 0 ]; then echo "test_cluster: up failed; tearing down" >&2; down; fi' EXIT
  trap 'exit 1' INT TERM

  local home hosts=$dir/hosts
  home=$(getent passwd root | cut -d: -f6)
  mkdir -p "$home/.ssh"  # the mount point of the nodes' own ~root/.ssh
  ssh-keygen -q -t ed25519 -N '' -C massl-test-cluster -f "$dir/ssh/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh_host_ed25519_key"
  cp "$dir/ssh/id_ed25519.pub" "$dir/ssh/authorized_keys"
  cat >"$dir/ssh/config" <<EOF
Host *
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
EOF
  cat >"$dir/sshd_config" <<EOF
HostKey $dir/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv *
EOF
  chmod 600 "$dir/ssh/"* "$dir/sshd_config"
  { echo "127.0.0.1 localhost"; for k in $(seq 1 "$n"); do echo "$net.$k node$k"; done; } >"$hosts"
  for k in $(seq 1 "$n"); do echo "node$k slots=2"; done >"$dir/hostfile"
  seq 1 "$n" | sed 's/^/node/' >"$dir/nodes"

  # The switch: a namespace holding the bridge that joins the nodes.
  # setsid: the holders stay out of the caller's process group (and the signals sent to it).
  setsid unshare --net --uts --mount sleep infinity </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/switch.pid"
  # Until the holder is in a network namespace of its own: its pid exists before unshare has made
  # it, and a bridge made before then would land in this (the host's) namespace.
  wait_for 5 sh -c "[ \"\$(readlink /proc/$!/ns/net)\" != \"\$(readlink /proc/$$/ns/net)\" ]" \
    || die "the switch's namespace did not start"
  readlink "/proc/$(holder switch)/ns/net" >"$dir/switch.netns"
  nsenter -t "$(holder switch)" -n sh -c "ip link set lo up && ip link add br0 type bridge && ip link set br0 up"
  mkdir -p /run/sshd  # sshd's privilege separation directory
  for k in $(seq 1 "$n"); do
    # A private mount namespace per node: its own /etc/hosts and ~root/.ssh, all else shared.
    setsid unshare --net --uts --mount sh -c "mount --bind '$hosts' /etc/hosts && mount --bind '$dir/ssh' '$home/.ssh' \
      && hostname node$k && exec sleep infinity" </dev/null >>"$dir/log/node$k.log" 2>&1 &
    echo $! >"$dir/node$k.pid"
    wait_for 5 sh -c "[ \"\$(nsenter -t $! -u hostname)\" = node$k ]" || die "node$k did not start"
    readlink "/proc/$(holder "node$k")/ns/net" >"$dir/node$k.netns"
    nsenter -t "$(holder switch)" -n ip link add "n$k" type veth peer name eth0 netns "$(holder "node$k")"
    nsenter -t "$(holder switch)" -n sh -c "ip link set n$k master br0 && ip link set n$k up"
    in_node_sh "node$k" "ip link set lo up && ip addr add $net.$k/24 dev eth0 && ip link set eth0 up"
    in_node_sh "node$k" "/usr/sbin/sshd -f '$dir/sshd_config' -o ListenAddress=$net.$k -o PidFile='$dir/sshd-node$k.pid' \
      -E '$dir/log/sshd-node$k.log'"
  done
  for k in $(seq 1 "$n"); do
    wait_for 20 in_node_sh node1 "ssh node$k true" || die "ssh node1 -> node$k fails; see $dir/log/sshd-node$k.log"
  done
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && [ "${MASSL_TEST_CLUSTER_SLURM:-1}" = 1 ]; then
    slurm_up "$n"
  fi
  if [ -n "${MASSL_TEST_CLUSTER_OWNER:-}" ]; then
    # Tears the cluster down once the owner is gone, however it ended.
    MASSL_TEST_CLUSTER_DIR=$dir setsid bash -c "while kill -0 $MASSL_TEST_CLUSTER_OWNER 2>/dev/null; do sleep 2; done; \
      exec '$self' down" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
  fi
  up_ok=1
  trap - INT TERM
  echo "hostfile=$dir/hostfile"
  for k in $(seq 1 "$n"); do echo "node$k=$net.$k"; done
  if [ -f "$dir/slurm/slurm.conf" ]; then echo "slurm_conf=$dir/slurm/slurm.conf"; fi
}

slurm_up() {
  local n=$1 s=$dir/slurm k node mem nodelist
  local sock=$s/munge.socket
  mkdir -p "$s/state" "$s/log"
  chmod 700 "$s"
  mungekey --create --keyfile="$s/munge.key"
  chmod 600 "$s/munge.key"
  # One munged for all nodes: its socket is a file on the shared file system.
  munged --force --socket="$sock" --key-file="$s/munge.key" --log-file="$s/log/munged.log" \
    --pid-file="$s/munged.pid" --seed-file="$s/munged.seed"
  wait_for 10 sh -c "munge -S '$sock' -n | unmunge -S '$sock'" || die "munged did not answer; see $s/log/munged.log"
  node=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$node")
  nodelist="node[1-$n]"
  cat >"$s/slurm.conf" <<EOF
ClusterName=massl-test-cluster
SlurmctldHost=node1($net.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool-%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd-%n.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$s/log/slurmd-%n.log
$(slurm_test_settings "$s")
KillWait=${KILL_WAIT:-5}
SlurmdTimeout=30
EOF
  # Every node is the same machine: the same CPUs, memory split between the nodes.
  for k in $(seq 1 "$n"); do
    echo "NodeName=node$k NodeAddr=$net.$k $node RealMemory=$((mem * 9 / 10 / n))" >>"$s/slurm.conf"
  done
  echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" >>"$s/slurm.conf"
  in_node_sh node1 "slurmctld -f '$s/slurm.conf'"
  for k in $(seq 1 "$n"); do in_node_sh "node$k" "slurmd -f '$s/slurm.conf' -N node$k"; done
  wait_for 60 in_node_sh node1 "[ \"\$(SLURM_CONF='$s/slurm.conf' sinfo -h -o %T | sort -u)\" = idle ]" \
    || die "Slurm nodes not idle after 60 s; see $s/log/"
}

[ $# -ge 1 ] || usage
case $1 in
  up) [ $# -eq 2 ] || usage; up "$2" ;;
  down) [ $# -eq 1 ] || usage; down ;;
  exec) [ $# -ge 3 ] || usage; node=$2; shift 2; in_node "$node" "$@" ;;
  kill) [ $# -eq 2 ] || usage; alive "$(holder "$2")" || die "$2 is not up"; kill_node "$2" ;;
  *) usage ;;
esac
