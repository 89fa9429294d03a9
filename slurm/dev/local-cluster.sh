#!/usr/bin/env bash
# A real Slurm (munged + slurmctld + one slurmd per node) on this machine, for tests, CI and trying the sbatch
# scripts on a workstation. Runs as root, without systemd; every daemon runs in its foreground mode as a
# background process of ours and is stopped by the PID we recorded, never by name.
#
#   slurm/dev/local-cluster.sh up [--nodes N]   install the Debian packages if missing, start, print `export ..`
#   slurm/dev/local-cluster.sh env      print `export SLURM_CONF=...`  (use: eval "$(slurm/dev/local-cluster.sh env)")
#   slurm/dev/local-cluster.sh status   daemons, PIDs and `sinfo`; exit 0 when all are up, 1 otherwise
#   slurm/dev/local-cluster.sh down     cancel this cluster's jobs, stop the daemons started by `up`, remove its network
#
# One node (the default): node `$(hostname -s)` at 127.0.0.1. N > 1 nodes: nodes n1..nN, each slurmd in its own
# network namespace (`ip netns`) with one veth into a bridge that only this script creates; node i has the address
# <subnet>.<i+1>, slurmctld listens on the bridge's <subnet>.1, so every node (and every job step, Ray node and
# trainer rank on it) has its own network stack, addresses and ports, as on separate hosts. Node names do not
# resolve, so `up` also writes a site env (printed as `export MLPREG_SITE_ENV=...`) that gives slurm/common.sh the
# Ray head's address and tells gloo which interface to use. The filesystem, CPUs and memory stay shared.
#
# Environment (all optional):
#   MLPREG_SLURM_DIR         private state, config and logs (default /tmp/mlpreg-slurm; the munge socket path
#                            under it must stay <= 107 bytes, so keep it short)
#   MLPREG_SLURM_NODES       node count for `up` when --nodes is not given (default 1)
#   MLPREG_SLURM_CPUS        CPUs each node advertises (default: nproc). More than nproc oversubscribes on purpose.
#   MLPREG_SLURM_MEM_MB      RealMemory of each node (default: MemTotal minus 1 GiB)
#   MLPREG_SLURM_GPUS        GPUs each node declares (default 0): gres `gpu` backed by character device nodes
#                            $MLPREG_SLURM_DIR/dev/gpu<k> (NVIDIA's major 195; no driver, nothing opens them), so
#                            `--gres=gpu:N` jobs schedule and get SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES as on
#                            a GPU node
#   MLPREG_SLURM_DEF_MEM_MB  DefMemPerCPU (default 1024): jobs that ask for no memory get this much per CPU, so
#                            several array tasks fit on the node at once
#   MLPREG_SLURM_CGROUP      1: enforce allocations as a site does, with task/cgroup and proctrack/cgroup (cgroup v1
#                            hierarchies under /sys/fs/cgroup; cores, memory and devices constrained). Default 0:
#                            task/none and proctrack/linuxproc, nothing enforced
#   MLPREG_SLURM_CTLD_PORT / MLPREG_SLURM_SLURMD_PORT   (default 6817 / 6818)
#   MLPREG_SLURM_SUBNET      N > 1 only: first three octets of the private /24 the nodes use (default 10.213.0).
#                            Namespace, bridge and veth names derive from the slurmctld port, so two clusters with
#                            different state dirs, slurmctld ports and subnets can run side by side.
set -euo pipefail

DIR=${MLPREG_SLURM_DIR:-/tmp/mlpreg-slurm}
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket
RUN=$DIR/run
NODE=$(hostname -s)
NODES_FILE=$DIR/etc/nodes   # node count of the cluster `up` started (read by status/env/down)
NET_FILE=$DIR/etc/network   # namespaces, veths and the bridge `up` created, one "kind name" per line
SITE_ENV=$DIR/etc/site.env  # N > 1: the site env for slurm/common.sh
CTLD_PORT=${MLPREG_SLURM_CTLD_PORT:-6817}
SUBNET=${MLPREG_SLURM_SUBNET:-10.213.0}
NET_TAG=mlp$CTLD_PORT       # prefix of namespace, bridge and veth names (Linux interface names: <= 15 bytes)
NS_IFACE=mlp0               # the node's interface inside its namespace (same name on every node)
NUM_NODES=1
DAEMONS=()                  # start order; `down` stops them in reverse. Set by set_nodes.

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_packages() {
  local missing=()
  for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root: install slurmctld slurmd slurm-client munge"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and munge by hand"
  log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >&2
}

# Node count and daemon list: one node keeps the historic names (daemon `slurmd`); N nodes get slurmd-n1..nN.
set_nodes() {
  NUM_NODES=$1
  [[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "node count must be a positive integer, got '$NUM_NODES'"
  (( NUM_NODES <= 64 )) || die "at most 64 nodes (got $NUM_NODES)"
  DAEMONS=(munged slurmctld)
  if (( NUM_NODES == 1 )); then
    DAEMONS+=(slurmd)
  else
    local i
    for ((i = 1; i <= NUM_NODES; i++)); do DAEMONS+=("slurmd-n$i"); done
  fi
}

node_addr() { echo "$SUBNET.$(($1 + 1))"; }   # node i (1-based) of a multi-node cluster

# N > 1, before anything starts: the tools, and a subnet in a private range (the nodes' addresses must exist on
# this machine alone).
check_net_inputs() {
  command -v ip >/dev/null && command -v nsenter >/dev/null ||
    die "$NUM_NODES nodes need \`ip\` (iproute2) and \`nsenter\` (util-linux)"
  [[ $CTLD_PORT =~ ^[0-9]{1,5}$ ]] || die "MLPREG_SLURM_CTLD_PORT must be a port number, got '$CTLD_PORT'"
  [[ $SUBNET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] ||
    die "MLPREG_SLURM_SUBNET must be the first three octets of a /24, e.g. 10.213.0 (got '$SUBNET')"
  local a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]} c=${BASH_REMATCH[3]}
  (( a <= 255 && b <= 255 && c <= 255 )) || die "MLPREG_SLURM_SUBNET $SUBNET is not an IPv4 prefix"
  if ! (( a == 10 || (a == 172 && b >= 16 && b <= 31) || (a == 192 && b == 168) )); then
    die "MLPREG_SLURM_SUBNET $SUBNET is not in a private range (10/8, 172.16/12, 192.168/16)"
  fi
}

check_subnet_free() {
  if ip -4 -o addr show | grep -q " inet $SUBNET\."; then
    die "subnet $SUBNET.0/24 is already in use on this machine (ip -4 addr); choose another MLPREG_SLURM_SUBNET"
  fi
}

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

# Alive and still the program we started (guards against a recycled PID). slurmd-n1 is a `slurmd`.
is_ours() {
  local name=$1 pid
  pid=$(pid_of "$name")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  local argv0
  argv0=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)
  [[ ${argv0##*/} == "${name%%-*}" ]]
}

all_up() {
  local d
  for d in "${DAEMONS[@]}"; do is_ours "$d" || return 1; done
}

write_conf() {
  local cpus mem_mb def_mem
  cpus=${MLPREG_SLURM_CPUS:-$(nproc)}
  mem_mb=${MLPREG_SLURM_MEM_MB:-$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m < 1024 ? 1024 : m)}' /proc/meminfo)}
  def_mem=${MLPREG_SLURM_DEF_MEM_MB:-1024}
  local ctld_addr=127.0.0.1 spool=$DIR/state/slurmd pidfile=$RUN/slurmd.own.pid logfile=$DIR/log/slurmd.log
  local gpus=${MLPREG_SLURM_GPUS:-0} gres="" gres_types=""
  [[ $gpus =~ ^[0-9]+$ ]] || die "MLPREG_SLURM_GPUS must be a non-negative integer, got '$gpus'"
  if (( gpus > 0 )); then
    gres=" Gres=gpu:$gpus" gres_types="GresTypes=gpu"
    mkdir -p "$DIR/dev"
    local g
    for ((g = 0; g < gpus; g++)); do
      [[ -c $DIR/dev/gpu$g ]] || mknod "$DIR/dev/gpu$g" c 195 "$g" || die "cannot mknod $DIR/dev/gpu$g"
    done
    printf 'AutoDetect=off\nName=gpu File=%s/dev/gpu[0-%d]\n' "$DIR" $((gpus - 1)) >"${CONF%/*}/gres.conf"
  else
    rm -f "${CONF%/*}/gres.conf"
  fi
  local nodes="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb$gres State=UNKNOWN" partition=$NODE
  if (( NUM_NODES > 1 )); then
    # %n: each slurmd (started with -N <name>) gets its own spool, pid and log file.
    ctld_addr=$SUBNET.1 spool=$DIR/state/slurmd/%n pidfile=$RUN/slurmd-%n.own.pid logfile=$DIR/log/slurmd-%n.log
    nodes="" partition="n[1-$NUM_NODES]"
    local i
    for ((i = 1; i <= NUM_NODES; i++)); do
      nodes+="NodeName=n$i NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem_mb$gres State=UNKNOWN"$'\n'
    done
    nodes=${nodes%$'\n'}
  fi
  [[ -z $gres_types ]] || nodes=$gres_types$'\n'$nodes
  local task=task/none proctrack=proctrack/linuxproc
  if [[ ${MLPREG_SLURM_CGROUP:-0} == 1 ]]; then
    task=task/cgroup proctrack=proctrack/cgroup
    printf 'CgroupPlugin=cgroup/v1\nConstrainCores=yes\nConstrainRAMSpace=yes\nConstrainDevices=yes\n' \
      >"${CONF%/*}/cgroup.conf"
  else
    rm -f "${CONF%/*}/cgroup.conf"
  fi
  cat >"$CONF" <<EOF
# Written by slurm/dev/local-cluster.sh; regenerated on every fresh \`up\`.
ClusterName=mlpreg-local
SlurmctldHost=$NODE($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=${MLPREG_SLURM_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$RUN/slurmctld.own.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$logfile
MailProg=/bin/true
# Default (no cgroups in containers): track processes by parent PID, no task binding. MLPREG_SLURM_CGROUP=1: cgroups.
ProctrackType=$proctrack
TaskPlugin=$task
MpiDefault=none
ReturnToService=2
# Allocate cores and memory, not whole nodes: array tasks share the node and run concurrently.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SlurmdParameters=config_overrides
# Quick scheduling and cleanup; finished jobs stay visible to scontrol for 10 minutes.
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
KillWait=5
MinJobAge=600
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
$nodes
PartitionName=debug Nodes=$partition Default=YES MaxTime=INFINITE State=UP
EOF
}

# N > 1: what slurm/common.sh needs on nodes whose names do not resolve. Sourced by the batch script (bash, set -a).
write_site_env() {
  cat >"$SITE_ENV" <<EOF
# Written by slurm/dev/local-cluster.sh for its $NUM_NODES-node cluster; use with MLPREG_SITE_ENV=$SITE_ENV.
# The node names (n1, n2, ...) do not resolve on this machine: the Ray head's IP is the first node's NodeAddr.
MLPREG_RAY_HEAD_IP=\$(scontrol -o show node "\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
# gloo binds the address the host name resolves to (127.0.0.1 here, unreachable from the other nodes) unless it
# is told the interface, as on clusters whose host names resolve to loopback or to the wrong network.
GLOO_SOCKET_IFNAME=$NS_IFACE
EOF
}

# N > 1: a bridge with <subnet>.1 in this namespace and, per node, a namespace joined to it by a veth pair
# (the node's end renamed to $NS_IFACE, address <subnet>.<i+1>). Every created object is recorded in NET_FILE.
net_up() {
  check_subnet_free
  local bridge=${NET_TAG}br i ns veth
  : >"$NET_FILE"
  ip link add "$bridge" type bridge || die "cannot create bridge $bridge (ip link add ... type bridge)"
  echo "link $bridge" >>"$NET_FILE"
  ip addr add "$SUBNET.1/24" dev "$bridge"
  ip link set "$bridge" up
  for ((i = 1; i <= NUM_NODES; i++)); do
    ns=$NET_TAG-n$i veth=${NET_TAG}n$i
    ip netns add "$ns" || die "cannot create network namespace $ns (ip netns add)"
    echo "netns $ns" >>"$NET_FILE"
    ip link add "$veth" type veth peer name "${veth}p" || die "cannot create veth pair $veth (ip link add)"
    echo "link $veth" >>"$NET_FILE"
    ip link set "${veth}p" netns "$ns"
    ip -n "$ns" link set "${veth}p" name "$NS_IFACE"
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$NS_IFACE"
    ip -n "$ns" link set "$NS_IFACE" up
    ip -n "$ns" link set lo up
    ip link set "$veth" master "$bridge"
    ip link set "$veth" up
  done
  log "network: bridge $bridge $SUBNET.1/24; nodes n1..n$NUM_NODES at $(node_addr 1)..$(node_addr "$NUM_NODES")" \
    "in namespaces $NET_TAG-n1..n$NUM_NODES"
}

net_down() {   # remove what net_up recorded: namespaces first (their veth ends go with them), then links
  [[ -f $NET_FILE ]] || return 0
  local kind name pids
  while read -r kind name; do
    [[ $kind == netns ]] || continue
    pids=$(ip netns pids "$name" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] && log "warning: processes still in namespace $name: $pids(not ours to kill)"
    ip netns del "$name" 2>/dev/null || true
  done <"$NET_FILE"
  while read -r kind name; do
    [[ $kind == link ]] || continue
    ip link del "$name" 2>/dev/null || true
  done < <(tac "$NET_FILE")
  rm -f "$NET_FILE"
  log "network removed"
}

start_daemon() {   # name, then the command line; records the PID of the foreground-mode process
  local name=$1
  shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

wait_for() {   # seconds, description, test command...
  local secs=$1 what=$2 i
  shift 2
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "$what did not come up within ${secs}s; see $DIR/log/"
}

nodes_ready() {   # every node of the partition is up
  local ready
  ready=$(sinfo -h -N -o '%N %T' | sort -u | grep -Ec ' (idle|mixed|allocated)$' || true)
  (( ready == NUM_NODES ))
}

env_lines() {
  echo "export SLURM_CONF=$CONF"
  (( NUM_NODES == 1 )) || echo "export MLPREG_SITE_ENV=$SITE_ENV"
}

cmd_up() {
  (( NUM_NODES == 1 )) || check_net_inputs
  ensure_packages
  export SLURM_CONF=$CONF
  local wanted=$NUM_NODES running
  running=$(cat "$NODES_FILE" 2>/dev/null || echo 1)
  set_nodes "$running"
  if all_up; then
    (( running == wanted )) || die "a $running-node cluster is already running in $DIR; \`down\` it first"
    log "already running ($DIR)"
    env_lines
    return 0
  fi
  cmd_down >/dev/null 2>&1 || true   # a half-started cluster: stop what is left, start fresh
  set_nodes "$wanted"
  local t0=$SECONDS i
  rm -rf "$DIR/state" "$RUN"
  mkdir -p "$DIR/etc" "$DIR/state/ctld" "$DIR/state/slurmd" "$DIR/log" "$RUN" "$DIR/munge"
  echo "$NUM_NODES" >"$NODES_FILE"
  chmod 0755 "$DIR" "$DIR/munge"
  (( ${#SOCKET} <= 107 )) || die "munge socket path $SOCKET is ${#SOCKET} bytes (> 107); set a shorter MLPREG_SLURM_DIR"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
  fi
  write_conf
  if (( NUM_NODES > 1 )); then
    net_up
    write_site_env
  fi
  start_daemon munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$RUN/munged.own.pid" --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"
  wait_for 10 munged test -S "$SOCKET"
  start_daemon slurmctld slurmctld -D -f "$CONF"
  if (( NUM_NODES == 1 )); then
    start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE"
  else
    # nsenter switches only the network namespace and execs slurmd (the recorded PID is slurmd's); `ip netns exec`
    # would also remount /sys, hiding /sys/fs/cgroup, and slurmd then fails ("Unable to initialize cgroup plugin").
    for ((i = 1; i <= NUM_NODES; i++)); do
      start_daemon "slurmd-n$i" nsenter --net="/run/netns/$NET_TAG-n$i" slurmd -D -f "$CONF" -N "n$i"
    done
  fi
  wait_for 30 slurmctld scontrol ping
  wait_for 60 "all $NUM_NODES node(s)" nodes_ready
  local pids="" d
  for d in "${DAEMONS[@]}"; do pids+=", $d $(pid_of "$d")"; done
  log "up in $((SECONDS - t0))s: ${pids#, }"
  env_lines
}

stop_pid() {   # name: TERM the recorded PID, wait up to 15 s, then KILL
  local name=$1 pid i
  is_ours "$name" || { rm -f "$RUN/$name.pid"; return 0; }
  pid=$(pid_of "$name")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name ($pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
  log "stopped $name ($pid)"
}

cancel_jobs() {   # jobs of this private cluster only; the daemons kill their steps within KillWait
  is_ours slurmctld || return 0
  export SLURM_CONF=$CONF
  local jobs i
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  [[ -n ${jobs// /} ]] || return 0
  log "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    [[ -z $(squeue -h -o %A 2>/dev/null) ]] && return 0
    sleep 0.1
  done
  log "jobs still listed after 15 s; stopping the daemons anyway"
}

cmd_down() {
  local t0=$SECONDS i
  cancel_jobs
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pid "${DAEMONS[i]}"; done
  net_down
  log "down in $((SECONDS - t0))s"
}

cmd_status() {
  local d rc=0
  for d in "${DAEMONS[@]}"; do
    if is_ours "$d"; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; rc=1; fi
  done
  if [[ $rc -eq 0 ]]; then
    SLURM_CONF=$CONF sinfo || rc=1
  fi
  if (( NUM_NODES > 1 )) && [[ -f $NET_FILE ]]; then
    echo "network: $(awk '{print $2}' "$NET_FILE" | tr '\n' ' ')"
  fi
  echo "SLURM_CONF=$CONF"
  return $rc
}

usage() { echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2; }

CMD=${1:-}
[[ $# -gt 0 ]] && shift
WANT_NODES=${MLPREG_SLURM_NODES:-1}
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) [[ $# -ge 2 ]] || usage; WANT_NODES=$2; shift 2 ;;
    --nodes=*) WANT_NODES=${1#--nodes=}; shift ;;
    *) usage ;;
  esac
done
[[ $CMD == up ]] || WANT_NODES=$(cat "$NODES_FILE" 2>/dev/null || echo 1)   # the cluster that `up` started
set_nodes "$WANT_NODES"

case $CMD in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) env_lines ;;
  *) usage ;;
esac
