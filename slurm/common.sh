# Shared by slurm/*.sbatch (sourced, not run). Environment checks, the site env, signal forwarding and requeue,
# and the Ray head/worker bootstrap. Decisions that need logic (which manifest row a task runs, the Ray port,
# GPUs per node, the requeue exit code) are made in Python: megatron_lpreg/launch/{job,slurm}.py.
#
# Variables read (all but MLPREG_ROOT optional; cluster facts belong in the site env, see site.example.env):
#   MLPREG_ROOT       the megatron_lpreg checkout holding slurm/ (the launcher exports it)
#   MLPREG_SITE_ENV   site env file sourced first (partition, account, modules, container, NCCL/network)
#   MLPREG_PYTHON     interpreter with megatron_lpreg installed (default: python3 on PATH)
#   MLPREG_SRUN_ARGS  extra srun options for every step, e.g. "--container-image=/path/img.sqsh" (pyxis)
#   MLPREG_RAY_WAIT_S seconds to wait for all Ray nodes to join (default 300)
#   MLPREG_PREEMPT_DIR set by the scripts: the trainer's run directory (preemption requests go there)

mlpreg_log() { echo "[mlpreg $(date +%H:%M:%S)] $*" >&2; }

# Load the site env, check the job environment, resolve the interpreter and the requeue exit code.
mlpreg_init() {
  : "${MLPREG_ROOT:?set MLPREG_ROOT to the megatron_lpreg checkout (sbatch --export=ALL,MLPREG_ROOT=...)}"
  : "${SLURM_JOB_ID:?not inside a Slurm job: submit this script with sbatch}"
  if [[ -n ${MLPREG_SITE_ENV:-} ]]; then
    [[ -f $MLPREG_SITE_ENV ]] || { mlpreg_log "MLPREG_SITE_ENV=$MLPREG_SITE_ENV does not exist"; exit 2; }
    set -a
    # shellcheck disable=SC1090
    source "$MLPREG_SITE_ENV"
    set +a
  fi
  MLPREG_PYTHON=${MLPREG_PYTHON:-python3}
  command -v "$MLPREG_PYTHON" >/dev/null || { mlpreg_log "MLPREG_PYTHON=$MLPREG_PYTHON not found"; exit 2; }
  read -r -a MLPREG_SRUN_EXTRA <<<"${MLPREG_SRUN_ARGS:-}"
  MLPREG_REQUEUE_CODE=$("$MLPREG_PYTHON" -m megatron_lpreg.launch.job requeue-code)
  MLPREG_PREEMPT_FILE=$("$MLPREG_PYTHON" -m megatron_lpreg.launch.job preempt-file)
  export PYTHONUNBUFFERED=1
  mlpreg_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none}" \
    "nodes ${SLURM_JOB_NODELIST:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
}

# One job step on NODE (default: any one node of the allocation) with the site's srun options.
# Usage: mlpreg_srun_argv [NODE]; fills the array MLPREG_SRUN_CMD.
mlpreg_srun_argv() {
  MLPREG_SRUN_CMD=(srun --nodes=1 --ntasks=1 --overlap --kill-on-bad-exit=1)
  [[ -n ${1:-} ]] && MLPREG_SRUN_CMD+=(--nodelist="$1")
  MLPREG_SRUN_CMD+=("${MLPREG_SRUN_EXTRA[@]}")
}

_mlpreg_forward() {   # signal name: pass it on to the running child
  mlpreg_log "got SIG$1; forwarding to pid ${MLPREG_CHILD:-?}"
  [[ -n ${MLPREG_CHILD:-} ]] && kill -s "$1" "$MLPREG_CHILD" 2>/dev/null || true
}

_mlpreg_preempt() {   # USR1 with MLPREG_PREEMPT_DIR: ask the trainer through its run directory
  # Written here, not by `python -m megatron_lpreg.launch.job preempt`: a Python start-up in the trap takes
  # seconds on a loaded node, long enough for a short run to finish before the request lands.
  mlpreg_log "got SIGUSR1; asking the trainer in $MLPREG_PREEMPT_DIR to checkpoint and exit for requeue"
  mkdir -p "$MLPREG_PREEMPT_DIR" && : >"$MLPREG_PREEMPT_DIR/$MLPREG_PREEMPT_FILE" || true
}

# Run a command (not a shell function) in the background and wait for it, handling USR1 (Slurm's
# --signal=B:USR1@<sec> warning, or `scancel --batch --signal=USR1`), TERM and INT. Sets MLPREG_RC.
# USR1: when MLPREG_PREEMPT_DIR names the trainer's run directory, the request goes through the trainer's flag
# file there (rank 0 polls it; a signal through srun would hit every process of the step, reward workers and
# forked ranks included); otherwise USR1 is forwarded to the child. TERM/INT are forwarded and set
# MLPREG_TERMINATING=1: the job is being cancelled, so it must not requeue itself.
mlpreg_run() {
  MLPREG_TERMINATING=0
  if [[ -n ${MLPREG_PREEMPT_DIR:-} ]]; then
    rm -f "$MLPREG_PREEMPT_DIR/$MLPREG_PREEMPT_FILE"   # a stale request from an earlier attempt
  fi
  # The trainer drops requests older than this (stale ones from an earlier attempt) and keeps those the trap
  # below writes while srun and the trainer are still starting.
  MLPREG_LAUNCH_TIME=$(date +%s.%N) "$@" &
  MLPREG_CHILD=$!
  if [[ -n ${MLPREG_PREEMPT_DIR:-} ]]; then trap _mlpreg_preempt USR1; else trap '_mlpreg_forward USR1' USR1; fi
  trap 'MLPREG_TERMINATING=1; _mlpreg_forward TERM' TERM
  trap 'MLPREG_TERMINATING=1; _mlpreg_forward INT' INT
  # A trapped signal interrupts `wait` (status 128 + signal) while the child may still run: wait again until it
  # is gone, then ask once more for its own status (bash keeps it for a child it has already reaped).
  while kill -0 "$MLPREG_CHILD" 2>/dev/null; do
    wait "$MLPREG_CHILD" || true
  done
  local rc=0
  wait "$MLPREG_CHILD" || rc=$?
  trap - USR1 TERM INT
  MLPREG_CHILD=
  MLPREG_RC=$rc
}

# Exit with MLPREG_RC, except that the requeue code (the trainer checkpointed on a signal) requeues this job or
# array task; the requeued job runs this script again and the trainer resumes (trainer.resume=auto).
mlpreg_finish() {
  if [[ $MLPREG_RC == "$MLPREG_REQUEUE_CODE" && $MLPREG_TERMINATING == 0 ]]; then
    mlpreg_log "trainer checkpointed for preemption (exit $MLPREG_RC): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  mlpreg_log "finished with exit code $MLPREG_RC"
  exit "$MLPREG_RC"
}

# Ray's own access control for this job (docs/slurm.md, "What Ray exposes"): token authentication with a random
# 256-bit token in a mode-600 file under the run directory (shared by the nodes; every Ray process of the job reads
# it through RAY_AUTH_TOKEN_PATH, srun passes the environment on), removed when Ray stops. A process that knows
# only IP:PORT is refused.
mlpreg_ray_auth() {
  local dir=${MLPREG_PREEMPT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/.ray-auth
  (umask 077 && mkdir -p "$dir")
  MLPREG_RAY_TOKEN_FILE=$dir/token-${SLURM_JOB_ID}
  (umask 077 && "$MLPREG_PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$MLPREG_RAY_TOKEN_FILE")
  chmod 600 "$MLPREG_RAY_TOKEN_FILE"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$MLPREG_RAY_TOKEN_FILE
}

# `ray start --head` flags beyond address and resources: no dashboard, and the Ray Client server (which Ray starts
# whenever grpc is installed and cannot be switched off) on a random free port instead of the fixed 10001.
mlpreg_ray_head_flags() {
  local client_port
  client_port=$("$MLPREG_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  MLPREG_RAY_HEAD_FLAGS=(--include-dashboard=false --ray-client-server-port="$client_port")
}

# Ray head on the first node, one worker per other node, each `ray start --block` in its own srun step; waits
# until every node has joined and exports RAY_ADDRESS for the driver. Stop with mlpreg_ray_stop.
mlpreg_ray_start() {
  eval "$("$MLPREG_PYTHON" -m megatron_lpreg.launch.job ray-env)"
  mlpreg_ray_auth
  mlpreg_ray_head_flags
  local ray_bin
  ray_bin=$(dirname "$(command -v "$MLPREG_PYTHON")")/ray
  [[ -x $ray_bin ]] || ray_bin=ray
  local resources=(--num-cpus="$MLPREG_RAY_CPUS_PER_NODE" --num-gpus="$MLPREG_RAY_GPUS_PER_NODE")
  mlpreg_log "Ray head $MLPREG_RAY_HEAD_NODE ($MLPREG_RAY_ADDRESS), $MLPREG_RAY_NUM_NODES node(s)," \
    "$MLPREG_RAY_GPUS_PER_NODE GPU(s) and $MLPREG_RAY_CPUS_PER_NODE CPU(s) per node"
  mlpreg_srun_argv "$MLPREG_RAY_HEAD_NODE"
  "${MLPREG_SRUN_CMD[@]}" "$ray_bin" start --head --block --node-ip-address="$MLPREG_RAY_HEAD_IP" \
    --port="$MLPREG_RAY_PORT" "${MLPREG_RAY_HEAD_FLAGS[@]}" "${resources[@]}" &
  MLPREG_RAY_HEAD_PID=$!
  MLPREG_RAY_WORKERS_PID=
  if [[ $MLPREG_RAY_NUM_WORKERS -gt 0 ]]; then
    srun --nodes="$MLPREG_RAY_NUM_WORKERS" --ntasks="$MLPREG_RAY_NUM_WORKERS" --ntasks-per-node=1 \
      --exclude="$MLPREG_RAY_HEAD_NODE" --overlap --kill-on-bad-exit=1 "${MLPREG_SRUN_EXTRA[@]}" \
      "$ray_bin" start --block --address="$MLPREG_RAY_ADDRESS" "${resources[@]}" &
    MLPREG_RAY_WORKERS_PID=$!
  fi
  "$MLPREG_PYTHON" -m megatron_lpreg.launch.job wait-ray --address "$MLPREG_RAY_ADDRESS" \
    --nodes "$MLPREG_RAY_NUM_NODES" --timeout "${MLPREG_RAY_WAIT_S:-300}"
  export RAY_ADDRESS=$MLPREG_RAY_ADDRESS
}

# Multi-node allocations (or MLPREG_RAY_BOOTSTRAP=1): start Ray across the nodes, stop it on exit, and run the
# trainer as the Ray driver on the head node. Sets MLPREG_TRAIN_OVERRIDES (extra dotted overrides for the trainer)
# and MLPREG_SRUN_CMD (the step that runs the trainer).
mlpreg_setup_launcher() {
  MLPREG_TRAIN_OVERRIDES=()
  if [[ ${SLURM_JOB_NUM_NODES:-1} -gt 1 || ${MLPREG_RAY_BOOTSTRAP:-0} == 1 ]]; then
    trap mlpreg_ray_stop EXIT
    mlpreg_ray_start
    MLPREG_TRAIN_OVERRIDES=(trainer.launcher=ray)
    mlpreg_srun_argv "$MLPREG_RAY_HEAD_NODE"
  else
    mlpreg_srun_argv
  fi
}

# Stop the srun steps mlpreg_ray_start launched (by their PIDs); `ray start --block` stops its node on SIGTERM.
mlpreg_ray_stop() {
  local pid i
  for pid in ${MLPREG_RAY_WORKERS_PID:-} ${MLPREG_RAY_HEAD_PID:-}; do
    kill -s TERM "$pid" 2>/dev/null || continue
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -s KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
  done
  MLPREG_RAY_HEAD_PID= MLPREG_RAY_WORKERS_PID=
  [[ -n ${MLPREG_RAY_TOKEN_FILE:-} ]] && rm -f "$MLPREG_RAY_TOKEN_FILE"
  mlpreg_log "Ray stopped"
}
