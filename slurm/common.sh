# Shared by slurm/*.sbatch (sourced, not run). Environment checks, the site env, container mode, step resources and
# the open-file limit, signal forwarding and requeue, and the Ray head/worker bootstrap. Decisions that need logic (which manifest row a task runs, the Ray port,
# GPUs per node, the requeue exit code) are made in Python: megatron_lpreg/launch/{job,slurm}.py.
#
# Variables read (all but MLPREG_ROOT optional; cluster facts belong in the site env, see site.example.env):
#   MLPREG_ROOT       the megatron_lpreg checkout holding slurm/ (the launcher exports it)
#   MLPREG_SITE_ENV   site env file sourced first (partition, account, modules, container, NCCL/network)
#   MLPREG_PYTHON     interpreter with megatron_lpreg installed (default: python3 on PATH; in container mode the
#                     image's, e.g. /opt/venv/bin/python)
#   MLPREG_SRUN_ARGS  extra srun options for every step (e.g. --mpi=none)
#   MLPREG_CONTAINER  container mode: pyxis or apptainer (default: none, Python runs on the host). Every Python call
#                     of the job (the steps below, the Ray head, workers and driver) then runs as an srun step
#                     inside MLPREG_CONTAINER_IMAGE; the batch shell runs only shell and Slurm commands.
#   MLPREG_CONTAINER_IMAGE   pyxis: a squashfs file or image reference; apptainer: a .sif file
#   MLPREG_CONTAINER_MOUNTS  SRC:DST[:ro],... (pyxis --container-mounts, apptainer --bind): the repository, data,
#                     run directories, and the node-local /tmp (the Ray head, worker and driver steps of a node meet
#                     in /tmp/ray)
#   MLPREG_APPTAINER_ARGS    `apptainer exec` flags (default --nv)
#   MLPREG_STEP_GPUS  GPUs per node for the Ray node and trainer steps (default: SLURM_GPUS_ON_NODE, else none)
#   MLPREG_STEP_CPUS  CPUs per task of those steps (default: SLURM_CPUS_ON_NODE)
#   MLPREG_STEP_MEM   --mem of those steps (default 0: all of the job's memory on the node)
#   MLPREG_NOFILE     open-file limit (`ulimit -n`) of the job and every step (default: the hard limit)
#   MLPREG_RAY_WAIT_S seconds to wait for all Ray nodes to join (default 300)
#   MLPREG_PREEMPT_DIR set by the scripts: the trainer's run directory (preemption requests go there; the Ray head,
#                     worker and driver logs go to its logs/ folder)

mlpreg_log() { echo "[mlpreg $(date +%H:%M:%S)] $*" >&2; }
mlpreg_die() { mlpreg_log "error: $*"; exit 2; }

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
  read -r -a MLPREG_SRUN_EXTRA <<<"${MLPREG_SRUN_ARGS:-}"
  mlpreg_container_init
  if [[ -z ${MLPREG_CONTAINER:-} ]]; then
    command -v "$MLPREG_PYTHON" >/dev/null || mlpreg_die "MLPREG_PYTHON=$MLPREG_PYTHON not found"
  fi
  mlpreg_raise_nofile
  mlpreg_step_resources
  export PYTHONUNBUFFERED=1
  mlpreg_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none}" \
    "nodes ${SLURM_JOB_NODELIST:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
  mlpreg_log "Python: ${MLPREG_CONTAINER:-host} ${MLPREG_CONTAINER_IMAGE:-} $MLPREG_PYTHON; steps: ${MLPREG_STEP_RES[*]};" \
    "open files: $(ulimit -Sn)"
  mlpreg_eval_py "the requeue code and flag file" -m megatron_lpreg.launch.job shell-env
  if [[ -z ${SLURM_JOB_END_TIME:-} ]]; then mlpreg_export_end_time; fi
}

# Container mode (MLPREG_CONTAINER): the srun options (pyxis) or command prefix (apptainer) that put a step inside
# the image. Fills MLPREG_STEP_OPTS and MLPREG_STEP_PREFIX (both empty without a container).
mlpreg_container_init() {
  MLPREG_STEP_OPTS=() MLPREG_STEP_PREFIX=()
  case ${MLPREG_CONTAINER:-} in
    "") return 0 ;;
    pyxis | apptainer) ;;
    *) mlpreg_die "MLPREG_CONTAINER=$MLPREG_CONTAINER: use pyxis or apptainer, or leave it empty (Python on the host)" ;;
  esac
  [[ -n ${MLPREG_CONTAINER_IMAGE:-} ]] ||
    mlpreg_die "MLPREG_CONTAINER=$MLPREG_CONTAINER needs MLPREG_CONTAINER_IMAGE (the image every Python step runs in)"
  if [[ $MLPREG_CONTAINER == pyxis ]]; then
    MLPREG_STEP_OPTS=(--container-image="$MLPREG_CONTAINER_IMAGE" --container-workdir="$PWD")
    [[ -z ${MLPREG_CONTAINER_MOUNTS:-} ]] || MLPREG_STEP_OPTS+=(--container-mounts="$MLPREG_CONTAINER_MOUNTS")
  else
    local flags
    read -r -a flags <<<"${MLPREG_APPTAINER_ARGS:---nv}"
    MLPREG_STEP_PREFIX=(apptainer exec "${flags[@]}" --pwd "$PWD")
    [[ -z ${MLPREG_CONTAINER_MOUNTS:-} ]] || MLPREG_STEP_PREFIX+=(--bind "$MLPREG_CONTAINER_MOUNTS")
    MLPREG_STEP_PREFIX+=("$MLPREG_CONTAINER_IMAGE")
  fi
}

# Raise the soft open-file limit to MLPREG_NOFILE (default: the hard limit). srun passes the batch shell's limits
# on to every step (Slurm's default PropagateResourceLimits=ALL); Ray, eight ranks, SGLang and the reward workers
# of one node easily pass the common default of 1024.
mlpreg_raise_nofile() {
  local hard want
  hard=$(ulimit -Hn)
  want=${MLPREG_NOFILE:-$hard}
  [[ $want == unlimited ]] && want=1048576
  if [[ $hard != unlimited ]] && ((want > hard)); then
    mlpreg_die "MLPREG_NOFILE=$want is above this node's hard limit of $hard open files; lower it in the site env"
  fi
  ulimit -Sn "$want" || mlpreg_die "ulimit -n $want failed (hard limit $hard)"
}

# Resources of the steps that run a Ray node or the trainer (one task per node each): GPUs, CPUs per task and
# memory, from the site env or else the allocation. Fills MLPREG_STEP_RES (srun options).
mlpreg_step_resources() {
  local gpus=${MLPREG_STEP_GPUS:-${SLURM_GPUS_ON_NODE:-0}} cpus=${MLPREG_STEP_CPUS:-${SLURM_CPUS_ON_NODE:-}}
  MLPREG_STEP_RES=(--mem="${MLPREG_STEP_MEM:-0}")
  [[ -z $cpus ]] || MLPREG_STEP_RES+=(--cpus-per-task="$cpus")
  [[ $gpus =~ ^[0-9]+$ ]] || mlpreg_die "MLPREG_STEP_GPUS=$gpus must be a GPU count per node"
  ((gpus == 0)) || MLPREG_STEP_RES+=(--gres=gpu:"$gpus")
}

# Python for a decision of the batch script: on the host, or (container mode) as a one-task step on this node
# inside the image, so that nothing but shell and Slurm commands runs in the batch shell. Usage: mlpreg_py ARGS...
mlpreg_py() {
  if [[ -z ${MLPREG_CONTAINER:-} ]]; then
    "$MLPREG_PYTHON" "$@"
    return
  fi
  srun --nodes=1 --ntasks=1 --overlap --quiet --nodelist="${SLURMD_NODENAME:-$(hostname -s)}" --cpus-per-task=1 \
    --mem=0 "${MLPREG_SRUN_EXTRA[@]}" "${MLPREG_STEP_OPTS[@]}" "${MLPREG_STEP_PREFIX[@]}" "$MLPREG_PYTHON" "$@"
}

# Run `mlpreg_py ARGS` and eval the export lines it prints; a failure stops the job here with Python's own error
# (a bare eval "$(...)" would swallow it and fail later on an unset variable). Usage: mlpreg_eval_py WHAT ARGS...
mlpreg_eval_py() {
  local what=$1 out
  shift
  out=$(mlpreg_py "$@") || mlpreg_die "could not compute $what (python $*): see the error above"
  eval "$out"
}

# Export the job's end time (epoch seconds) as newer Slurm releases do: the trainer stops before it
# (megatron_lpreg/trainer/walltime.py; in container mode the image has no Slurm commands to ask), and a TERM at or
# after it is Slurm's time limit, not a cancellation (mlpreg_run).
mlpreg_export_end_time() {
  local end
  local job=$SLURM_JOB_ID
  # An array task can share its job id with the array, whose `squeue -j` lists every task: ask for the task itself.
  [[ -z ${SLURM_ARRAY_JOB_ID:-} || -z ${SLURM_ARRAY_TASK_ID:-} ]] || job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  end=$(squeue -h -j "$job" -o %e 2>/dev/null | head -n 1 || true)
  if [[ $end =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]]; then
    SLURM_JOB_END_TIME=$(date -d "$end" +%s)
    export SLURM_JOB_END_TIME
  fi
}

# The folder for this job's step logs (Ray head, workers, driver): RUN_DIR/logs when the run directory is known,
# created here. Prints nothing and returns 1 otherwise (the step then writes to the job log).
mlpreg_log_dir() {
  [[ -n ${MLPREG_PREEMPT_DIR:-} ]] || return 1
  mkdir -p "$MLPREG_PREEMPT_DIR/logs" && echo "$MLPREG_PREEMPT_DIR/logs"
}

# One job step on NODE (default: any one node of the allocation) with the step resources, the site's srun options
# and (container mode) the image; its output goes to LOG (appended) when given, else to the job log. The caller
# appends the command ("$MLPREG_PYTHON" ...). Usage: mlpreg_srun_argv [NODE] [LOG]; fills the array MLPREG_SRUN_CMD.
mlpreg_srun_argv() {
  MLPREG_SRUN_CMD=(srun --nodes=1 --ntasks=1 --overlap --kill-on-bad-exit=1 "${MLPREG_STEP_RES[@]}")
  [[ -z ${1:-} ]] || MLPREG_SRUN_CMD+=(--nodelist="$1")
  [[ -z ${2:-} ]] || MLPREG_SRUN_CMD+=(--output="$2" --open-mode=append)
  MLPREG_SRUN_CMD+=("${MLPREG_SRUN_EXTRA[@]}" "${MLPREG_STEP_OPTS[@]}" "${MLPREG_STEP_PREFIX[@]}")
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

_mlpreg_term() {
  if [[ -n ${SLURM_JOB_END_TIME:-} ]] && (($(date +%s) + 2 >= ${SLURM_JOB_END_TIME%.*})); then
    mlpreg_log "TERM at the time limit: the job is requeued if the trainer checkpoints and exits with" \
      "$MLPREG_REQUEUE_CODE before Slurm's KillWait ends"
  else
    MLPREG_TERMINATING=1
  fi
  _mlpreg_forward TERM
}

# Run a command (not a shell function) in the background and wait for it, handling USR1 (Slurm's
# --signal=B:USR1@<sec> warning, or `scancel --batch --signal=USR1`), TERM and INT. Sets MLPREG_RC.
# USR1: when MLPREG_PREEMPT_DIR names the trainer's run directory, the request goes through the trainer's flag
# file there (rank 0 polls it; a signal through srun would hit every process of the step, reward workers and
# forked ranks included); otherwise USR1 is forwarded to the child. TERM/INT are forwarded and set
# MLPREG_TERMINATING=1: the job is being cancelled, so it must not requeue itself; except a TERM at the time limit
# (SLURM_JOB_END_TIME reached): the trainer saves if its step ends within KillWait, and its exit 42 requeues the job.
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
  trap _mlpreg_term TERM
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
  if [[ $MLPREG_RC != 0 && -s ${MLPREG_DRIVER_LOG:-} ]]; then
    mlpreg_log "last lines of the driver log $MLPREG_DRIVER_LOG:"
    tail -n 40 "$MLPREG_DRIVER_LOG" >&2
  fi
  mlpreg_log "finished with exit code $MLPREG_RC"
  exit "$MLPREG_RC"
}

# Ray's own access control for this job (docs/slurm.md, "What Ray exposes"): token authentication with a random
# 256-bit token in a mode-600 file under the run directory (shared by the nodes; every Ray process of the job reads
# it through RAY_AUTH_TOKEN_PATH, srun passes the environment on), removed when Ray stops. A process that knows
# only IP:PORT is refused. The token comes from /dev/urandom here: no Python in the batch shell.
mlpreg_ray_auth() {
  local dir=${MLPREG_PREEMPT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/.ray-auth
  (umask 077 && mkdir -p "$dir")
  MLPREG_RAY_TOKEN_FILE=$dir/token-${SLURM_JOB_ID}
  (umask 077 && head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \n' >"$MLPREG_RAY_TOKEN_FILE" &&
    echo >>"$MLPREG_RAY_TOKEN_FILE")
  chmod 600 "$MLPREG_RAY_TOKEN_FILE"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$MLPREG_RAY_TOKEN_FILE
}

# Ray head on the first node, one worker per other node, each `ray start --block` in its own srun step (logs:
# RUN_DIR/logs/ray-head-<job>.log and ray-worker-<job>-<node>.log); waits until every node has joined and exports
# RAY_ADDRESS for the driver. `ray start --head` gets no dashboard, and the Ray Client server (which Ray starts
# whenever grpc is installed and cannot be switched off) a free port of the head node (from ray-env) instead of
# the fixed 10001. Stop with mlpreg_ray_stop.
# The Ray head's access flags: no dashboard, and the Ray Client server on the free port ray-env chose
# (MLPREG_RAY_CLIENT_PORT), never the fixed 10001. Sets the array MLPREG_RAY_HEAD_FLAGS.
mlpreg_ray_head_flags() {
  MLPREG_RAY_HEAD_FLAGS=(--include-dashboard=false
    --ray-client-server-port="${MLPREG_RAY_CLIENT_PORT:?run ray-env first (mlpreg_ray_start does)}")
}

mlpreg_ray_start() {
  mlpreg_eval_py "the Ray layout of this allocation" -m megatron_lpreg.launch.job ray-env
  mlpreg_ray_auth
  mlpreg_ray_head_flags
  local ray=("$MLPREG_PYTHON" -m ray.scripts.scripts) logs=""
  local resources=(--num-cpus="$MLPREG_RAY_CPUS_PER_NODE" --num-gpus="$MLPREG_RAY_GPUS_PER_NODE")
  logs=$(mlpreg_log_dir) || logs=""
  mlpreg_log "Ray head $MLPREG_RAY_HEAD_NODE ($MLPREG_RAY_ADDRESS), $MLPREG_RAY_NUM_NODES node(s)," \
    "$MLPREG_RAY_GPUS_PER_NODE GPU(s) and $MLPREG_RAY_CPUS_PER_NODE CPU(s) per node; logs in ${logs:-the job log}"
  mlpreg_srun_argv "$MLPREG_RAY_HEAD_NODE" "${logs:+$logs/ray-head-$SLURM_JOB_ID.log}"
  "${MLPREG_SRUN_CMD[@]}" "${ray[@]}" start --head --block --node-ip-address="$MLPREG_RAY_HEAD_IP" \
    --port="$MLPREG_RAY_PORT" "${MLPREG_RAY_HEAD_FLAGS[@]}" "${resources[@]}" &
  MLPREG_RAY_HEAD_PID=$!
  MLPREG_RAY_WORKERS_PID=
  if [[ $MLPREG_RAY_NUM_WORKERS -gt 0 ]]; then
    local output=()
    [[ -z $logs ]] || output=(--output="$logs/ray-worker-$SLURM_JOB_ID-%N.log" --open-mode=append)
    srun --nodes="$MLPREG_RAY_NUM_WORKERS" --ntasks="$MLPREG_RAY_NUM_WORKERS" --ntasks-per-node=1 \
      --exclude="$MLPREG_RAY_HEAD_NODE" --overlap --kill-on-bad-exit=1 "${MLPREG_STEP_RES[@]}" "${output[@]}" \
      "${MLPREG_SRUN_EXTRA[@]}" "${MLPREG_STEP_OPTS[@]}" "${MLPREG_STEP_PREFIX[@]}" \
      "${ray[@]}" start --block --address="$MLPREG_RAY_ADDRESS" "${resources[@]}" &
    MLPREG_RAY_WORKERS_PID=$!
  fi
  mlpreg_py -m megatron_lpreg.launch.job wait-ray --address "$MLPREG_RAY_ADDRESS" \
    --nodes "$MLPREG_RAY_NUM_NODES" --timeout "${MLPREG_RAY_WAIT_S:-300}" ||
    mlpreg_die "Ray did not come up; see ${logs:-the job log} (ray-head-$SLURM_JOB_ID.log, ray-worker-*.log)"
  export RAY_ADDRESS=$MLPREG_RAY_ADDRESS
}

# Multi-node allocations (or MLPREG_RAY_BOOTSTRAP=1): start Ray across the nodes, stop it on exit, and run the
# trainer as the Ray driver on the head node. Sets MLPREG_TRAIN_OVERRIDES (extra dotted overrides for the trainer),
# MLPREG_SRUN_CMD (the step that runs the trainer) and MLPREG_DRIVER_LOG (RUN_DIR/logs/driver-<job>.log, the
# trainer's output, when the run directory is known; its tail reaches the job log when the trainer fails).
mlpreg_setup_launcher() {
  MLPREG_TRAIN_OVERRIDES=()
  MLPREG_DRIVER_LOG=$(mlpreg_log_dir) && MLPREG_DRIVER_LOG+=/driver-$SLURM_JOB_ID.log || MLPREG_DRIVER_LOG=""
  if [[ ${SLURM_JOB_NUM_NODES:-1} -gt 1 || ${MLPREG_RAY_BOOTSTRAP:-0} == 1 ]]; then
    trap mlpreg_ray_stop EXIT
    mlpreg_ray_start
    MLPREG_TRAIN_OVERRIDES=(trainer.launcher=ray)
    mlpreg_srun_argv "$MLPREG_RAY_HEAD_NODE" "$MLPREG_DRIVER_LOG"
  else
    mlpreg_srun_argv "" "$MLPREG_DRIVER_LOG"
  fi
  [[ -z $MLPREG_DRIVER_LOG ]] || mlpreg_log "driver (trainer) log: $MLPREG_DRIVER_LOG"
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
