#!/usr/bin/env bash
# A real single-node Slurm (munged + slurmctld + slurmd) on this machine, for tests, CI and trying the sbatch
# scripts on a workstation. Runs as root, without systemd; every daemon runs in its foreground mode as a
# background process of ours and is stopped by the PID we recorded, never by name.
#
#   slurm/dev/local-cluster.sh up       install the Debian packages if missing, start, print `export SLURM_CONF=..`
#   slurm/dev/local-cluster.sh env      print `export SLURM_CONF=...`  (use: eval "$(slurm/dev/local-cluster.sh env)")
#   slurm/dev/local-cluster.sh status   daemons, PIDs and `sinfo`; exit 0 when all are up, 1 otherwise
#   slurm/dev/local-cluster.sh down     cancel this cluster's jobs, stop the daemons started by `up`
#
# Environment (all optional):
#   MLPREG_SLURM_DIR         private state, config and logs (default /tmp/mlpreg-slurm; the munge socket path
#                            under it must stay <= 107 bytes, so keep it short)
#   MLPREG_SLURM_CPUS        CPUs the node advertises (default: nproc). More than nproc oversubscribes on purpose.
#   MLPREG_SLURM_MEM_MB      RealMemory of the node (default: MemTotal minus 1 GiB)
#   MLPREG_SLURM_DEF_MEM_MB  DefMemPerCPU (default 1024): jobs that ask for no memory get this much per CPU, so
#                            several array tasks fit on the node at once
#   MLPREG_SLURM_CTLD_PORT / MLPREG_SLURM_SLURMD_PORT   (default 6817 / 6818)
set -euo pipefail

DIR=${MLPREG_SLURM_DIR:-/tmp/mlpreg-slurm}
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket
RUN=$DIR/run
NODE=$(hostname -s)
DAEMONS=(munged slurmctld slurmd)   # start order; `down` stops them in reverse

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

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

# Alive and still the program we started (guards against a recycled PID).
is_ours() {
  local name=$1 pid
  pid=$(pid_of "$name")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  local argv0
  argv0=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)
  [[ ${argv0##*/} == "$name" ]]
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
  cat >"$CONF" <<EOF
# Written by slurm/dev/local-cluster.sh; regenerated on every fresh \`up\`.
ClusterName=mlpreg-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${MLPREG_SLURM_CTLD_PORT:-6817}
SlurmdPort=${MLPREG_SLURM_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.own.pid
SlurmdPidFile=$RUN/slurmd.own.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MailProg=/bin/true
# No cgroups in containers: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
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
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
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

node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated)'; }

cmd_up() {
  ensure_packages
  export SLURM_CONF=$CONF
  if all_up; then
    log "already running ($DIR)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  cmd_down >/dev/null 2>&1 || true   # a half-started cluster: stop what is left, start fresh
  local t0=$SECONDS
  rm -rf "$DIR/state" "$RUN"
  mkdir -p "$DIR/etc" "$DIR/state/ctld" "$DIR/state/slurmd" "$DIR/log" "$RUN" "$DIR/munge"
  chmod 0755 "$DIR" "$DIR/munge"
  (( ${#SOCKET} <= 107 )) || die "munge socket path $SOCKET is ${#SOCKET} bytes (> 107); set a shorter MLPREG_SLURM_DIR"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
  fi
  write_conf
  start_daemon munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$RUN/munged.own.pid" --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"
  wait_for 10 munged test -S "$SOCKET"
  start_daemon slurmctld slurmctld -D -f "$CONF"
  start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE"
  wait_for 30 slurmctld scontrol ping
  wait_for 30 "node $NODE" node_ready
  log "up in $((SECONDS - t0))s: munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd)"
  echo "export SLURM_CONF=$CONF"
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
  echo "SLURM_CONF=$CONF"
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
