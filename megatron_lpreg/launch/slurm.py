"""Talking to Slurm: find its commands, build ``sbatch`` command lines, read the job environment, poll job states.

Everything here is plain data in, plain data out, except the few functions that run a Slurm command
(:func:`submit`, :func:`array_task_states`, :func:`queued_tasks`, :func:`wait_for_job`). The sbatch scripts in
``slurm/`` only assemble arguments; the decisions (which overrides a task runs, the Ray head address and port,
whether to requeue) are made in Python, here and in :mod:`megatron_lpreg.launch.job`.

Preemption contract (used by the trainer and by ``slurm/common.sh``): on SIGUSR1 the trainer writes a
checkpoint and exits with :data:`REQUEUE_EXIT_CODE`; the batch script turns that code into
``scontrol requeue $SLURM_JOB_ID`` and the requeued job resumes with ``trainer.resume=auto``.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from megatron_lpreg.rundir import REQUEUE_EXIT_CODE  # noqa: F401  (the one definition; re-exported)

logger = logging.getLogger(__name__)

SQUEUE_RETRIES = 5
"""wait_for_job gives up after this many squeue failures in a row."""

RAY_PORT_BASE = 20000
RAY_PORT_SPAN = 10000
"""Ray head GCS port = RAY_PORT_BASE + job_id % RAY_PORT_SPAN, so two jobs sharing a node do not collide."""


class SlurmError(RuntimeError):
    """Slurm is missing, a Slurm command failed, or the Slurm environment is not what a step needs."""


# ---- finding Slurm --------------------------------------------------------------------------------------------
def slurm_command(name: str, env: Mapping[str, str] | None = None) -> str:
    """Absolute path of Slurm command ``name`` (sbatch, squeue, scontrol, ...).

    Raises:
        SlurmError: the command is not on PATH, with the fix (install Slurm or start the local dev cluster).
    """
    path = shutil.which(name, path=(env if env is not None else os.environ).get("PATH"))
    if path is None:
        raise SlurmError(
            f"'{name}' not found on PATH: Slurm client tools are not installed here. Run on a Slurm login node, "
            "or start the local dev cluster: slurm/dev/local-cluster.sh up && "
            'eval "$(slurm/dev/local-cluster.sh env)"; use --dry-run to only print the sbatch command'
        )
    return path


def scripts_dir(env: Mapping[str, str] | None = None) -> Path:
    """The repository's ``slurm/`` directory (``$MLPREG_ROOT/slurm``, else next to the package).

    Raises:
        SlurmError: the directory (with ``common.sh``) does not exist.
    """
    env = os.environ if env is None else env
    root = Path(env["MLPREG_ROOT"]) if env.get("MLPREG_ROOT") else Path(__file__).resolve().parents[2]
    slurm_dir = root / "slurm"
    if not (slurm_dir / "common.sh").is_file():
        raise SlurmError(
            f"sbatch scripts not found in {slurm_dir}: set MLPREG_ROOT to the megatron_lpreg checkout that holds "
            "slurm/common.sh (a non-editable pip install does not ship them)"
        )
    return slurm_dir.resolve()


def site_environment(path: str | os.PathLike, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables a site env file (``slurm/site.example.env`` format: bash ``KEY=value`` lines) sets or changes.

    The file is sourced by bash with ``set -a`` so that sbatch sees ``SBATCH_PARTITION``, ``SBATCH_ACCOUNT``, ...
    at submission time exactly as the job sees them when ``slurm/common.sh`` sources the same file.

    Raises:
        SlurmError: the file is missing or bash fails on it.
    """
    path = Path(path)
    if not path.is_file():
        raise SlurmError(f"site env file not found: {path} (copy slurm/site.example.env and edit it)")
    base = dict(os.environ if base_env is None else base_env)
    proc = subprocess.run(
        ["bash", "-c", 'set -a; source "$1" >/dev/null; env -0', "bash", str(path)],
        env=base, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SlurmError(f"sourcing site env {path} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    after = dict(item.split("=", 1) for item in proc.stdout.split("\0") if "=" in item)
    skip = {"_", "SHLVL", "PWD", "OLDPWD"}
    return {k: v for k, v in after.items() if k not in skip and base.get(k) != v}


# ---- sbatch command lines -------------------------------------------------------------------------------------
def array_spec(num_tasks: int, max_parallel: int | None = None) -> str:
    """``--array`` value for tasks ``0..num_tasks-1`` with at most ``max_parallel`` running at once.

    Raises:
        ValueError: ``num_tasks < 1`` (an empty sweep) or ``max_parallel < 1``.
    """
    if num_tasks < 1:
        raise ValueError(f"a job array needs at least one task, got num_tasks={num_tasks} (empty sweep?)")
    spec = f"0-{num_tasks - 1}"
    if max_parallel is not None:
        if max_parallel < 1:
            raise ValueError(f"--max-parallel={max_parallel} must be >= 1 (or left out for no limit)")
        spec += f"%{max_parallel}"
    return spec


@dataclass(kw_only=True)
class SbatchRequest:
    """One ``sbatch`` invocation. ``argv()`` is the exact command line; nothing else is implied."""

    script: Path
    """The batch script (``slurm/*.sbatch``)."""
    script_args: list[str] = field(default_factory=list)
    """Arguments after the script path, seen by the script as ``$@``."""
    job_name: str = "mlpreg"
    """``--job-name`` (the ``%x`` in log names)."""
    output: str = ""
    """``--output`` pattern, e.g. ``DIR/logs/%x-%A_%a.out``; empty: the script's default."""
    array: str = ""
    """``--array`` spec, e.g. ``0-5%2``; empty: not an array."""
    dependency: str = ""
    """``--dependency``, e.g. ``afterok:1234``."""
    export: dict[str, str] = field(default_factory=dict)
    """Variables added to the job environment on top of the submitting environment (``--export=ALL,K=V``)."""
    extra_args: list[str] = field(default_factory=list)
    """Further sbatch options passed through verbatim (``--partition=gpu``, ``--time=1:00:00``)."""

    def argv(self, sbatch: str = "sbatch") -> list[str]:
        """The command line, ``--parsable`` so that stdout is the job id."""
        cmd = [sbatch, "--parsable", f"--job-name={self.job_name}"]
        if self.output:
            cmd.append(f"--output={self.output}")
        if self.array:
            cmd.append(f"--array={self.array}")
        if self.dependency:
            cmd.append(f"--dependency={self.dependency}")
        if self.export:
            for key, value in self.export.items():
                if "," in value:
                    # sbatch splits --export on commas; such a value cannot be passed this way.
                    raise ValueError(f"cannot export {key}={value!r} through sbatch --export: it contains ','")
            cmd.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in self.export.items())]))
        return [*cmd, *self.extra_args, str(self.script), *self.script_args]


_DEPENDENCY = re.compile(r"^(after|afterany|afterok|afternotok|aftercorr|afterburstbuffer|singleton)"
                         r"(:\d+(_\d+)?(\+\d+)?)*$")


def check_dependency(text: str) -> str:
    """Validate a ``--dependency`` value such as ``afterok:1234`` or ``afterok:12:13,afterany:14``.

    Raises:
        ValueError: a part does not look like ``type:jobid[:jobid...]``.
    """
    parts = re.split(r"[,?]", text)
    for part in parts:
        if not _DEPENDENCY.match(part) or (part != "singleton" and ":" not in part):
            raise ValueError(
                f"--dependency={text!r}: '{part}' is not a Slurm dependency; expected e.g. afterok:<jobid>"
            )
    return text


def submit(request: SbatchRequest, env: Mapping[str, str] | None = None) -> str:
    """Run sbatch for ``request``; return the job id.

    Raises:
        SlurmError: sbatch is missing or rejects the job (its stderr is in the message).
    """
    env = dict(os.environ if env is None else env)
    argv = request.argv(slurm_command("sbatch", env))
    logger.info("submitting: %s", shlex.join(argv))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}\ncommand: {shlex.join(argv)}")
    return parse_job_id(proc.stdout)


def parse_job_id(parsable_output: str) -> str:
    """Job id from ``sbatch --parsable`` output (``1234`` or ``1234;cluster``).

    Raises:
        SlurmError: the output holds no job id.
    """
    text = parsable_output.strip().splitlines()[-1] if parsable_output.strip() else ""
    job_id = text.split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmError(f"could not read a job id from sbatch output {parsable_output!r}")
    return job_id


# ---- the job environment --------------------------------------------------------------------------------------
def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist (``gpu[01-03,07],login1``) to host names, in order.

    Zero padding of a range is kept (``n[08-10]`` -> n08 n09 n10). Several bracket groups in one name
    (``r[1-2]n[1-2]``) expand as a product, left group slowest.

    Raises:
        ValueError: unbalanced brackets or a malformed range.
    """
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        hosts.extend(_expand_one(item, expr))
    return hosts


def _split_top_level(expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {expr!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"hostlist {expr!r}: unbalanced '['")
    items.append(expr[start:])
    return [item for item in items if item]


def _expand_one(item: str, expr: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"hostlist {expr!r}: bad range '{part}'")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(_expand_one(f"{prefix}{n:0{width}d}{suffix}", expr))
    return out


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand Slurm's compressed per-node counts (``16(x2),8`` -> [16, 16, 8]).

    Raises:
        ValueError: a part is not ``N`` or ``N(xK)``.
    """
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot parse per-node count list {text!r} at '{part}'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _gpus_per_node(env: Mapping[str, str]) -> int:
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    per_node = env.get("SLURM_GPUS_PER_NODE", "")  # "4", "gpu:4", "a100:4"
    if per_node:
        tail = per_node.rsplit(":", 1)[-1].split("(", 1)[0]
        if tail.isdigit():
            return int(tail)
    job_gpus = env.get("SLURM_JOB_GPUS", "") or env.get("CUDA_VISIBLE_DEVICES", "")
    return len([g for g in job_gpus.split(",") if g.strip()])


@dataclass(frozen=True, kw_only=True)
class SlurmJobEnv:
    """What a batch script or job step learns from Slurm's environment variables."""

    job_id: str
    """``SLURM_JOB_ID`` (for an array task: that task's own job id)."""
    job_name: str
    array_job_id: str
    """``SLURM_ARRAY_JOB_ID`` ('' outside arrays): the ``%A`` of log names."""
    array_task_id: int | None
    """``SLURM_ARRAY_TASK_ID`` (None outside arrays): the ``%a`` of log names, the manifest row."""
    nodes: tuple[str, ...]
    """Allocated hosts, expanded from ``SLURM_JOB_NODELIST``; the first one runs the batch script."""
    gpus_per_node: int
    """GPUs allocated on each node (0 on CPU-only allocations)."""
    cpus_per_node: int
    """CPUs allocated on the first node."""
    restart_count: int
    """``SLURM_RESTART_COUNT``: how many times this job was requeued."""
    submit_dir: str

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> SlurmJobEnv:
        """Parse a job's environment (pass ``os.environ`` inside a job).

        Raises:
            SlurmError: not inside a Slurm job (no ``SLURM_JOB_ID``) or an unparsable variable.
        """
        if not env.get("SLURM_JOB_ID"):
            raise SlurmError("not inside a Slurm job: SLURM_JOB_ID is not set (submit with sbatch)")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            nodes = tuple(expand_hostlist(nodelist)) if nodelist else (socket.gethostname().split(".")[0],)
            cpus = parse_tasks_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
        except ValueError as exc:
            raise SlurmError(f"bad Slurm environment: {exc}") from exc
        task = env.get("SLURM_ARRAY_TASK_ID", "")
        return cls(
            job_id=env["SLURM_JOB_ID"],
            job_name=env.get("SLURM_JOB_NAME", ""),
            array_job_id=env.get("SLURM_ARRAY_JOB_ID", ""),
            array_task_id=int(task) if task.isdigit() else None,
            nodes=nodes,
            gpus_per_node=_gpus_per_node(env),
            cpus_per_node=int(env["SLURM_CPUS_ON_NODE"]) if env.get("SLURM_CPUS_ON_NODE", "").isdigit()
            else (cpus[0] if cpus else 1),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            submit_dir=env.get("SLURM_SUBMIT_DIR", ""),
        )


@dataclass(frozen=True, kw_only=True)
class RayLayout:
    """Where the Ray head runs and what each node offers, derived from the Slurm allocation."""

    head_node: str
    head_ip: str
    port: int
    num_nodes: int
    gpus_per_node: int
    cpus_per_node: int

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def shell_exports(self) -> str:
        """``export`` lines for ``slurm/common.sh`` (eval'd by bash)."""
        values = {
            "MLPREG_RAY_HEAD_NODE": self.head_node, "MLPREG_RAY_HEAD_IP": self.head_ip,
            "MLPREG_RAY_PORT": str(self.port), "MLPREG_RAY_ADDRESS": self.address,
            "MLPREG_RAY_NUM_NODES": str(self.num_nodes), "MLPREG_RAY_NUM_WORKERS": str(self.num_nodes - 1),
            "MLPREG_RAY_GPUS_PER_NODE": str(self.gpus_per_node),
            "MLPREG_RAY_CPUS_PER_NODE": str(self.cpus_per_node),
        }
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def ray_layout(
    job: SlurmJobEnv,
    env: Mapping[str, str],
    resolve: Callable[[str], str] = socket.gethostbyname,
) -> RayLayout:
    """Ray head address, port and per-node resources for ``job``.

    The head runs on the first allocated node. Its IP is ``MLPREG_RAY_HEAD_IP`` if set (site env), else the
    address ``resolve`` gives for the head's host name. The port is ``MLPREG_RAY_PORT`` if set, else
    ``RAY_PORT_BASE + job_id % RAY_PORT_SPAN``.

    Raises:
        SlurmError: a multi-node job whose head name resolves to a loopback address (workers could not reach
            it): set MLPREG_RAY_HEAD_IP or fix the host's name resolution.
    """
    head = job.nodes[0]
    head_ip = env.get("MLPREG_RAY_HEAD_IP") or resolve(head)
    if job.num_nodes > 1 and head_ip.startswith("127."):
        raise SlurmError(
            f"Ray head node {head} resolves to loopback {head_ip}, which the other {job.num_nodes - 1} nodes "
            "cannot reach; set MLPREG_RAY_HEAD_IP (e.g. from the InfiniBand interface) in the site env"
        )
    port = int(env["MLPREG_RAY_PORT"]) if env.get("MLPREG_RAY_PORT") else \
        RAY_PORT_BASE + int(job.job_id) % RAY_PORT_SPAN
    return RayLayout(head_node=head, head_ip=head_ip, port=port, num_nodes=job.num_nodes,
                     gpus_per_node=job.gpus_per_node, cpus_per_node=job.cpus_per_node)


# ---- job states -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskState:
    """Scheduler view of one array task (or of a plain job, task 0)."""

    task: int
    state: str
    exit_code: int


def parse_scontrol_jobs(text: str) -> list[TaskState]:
    """Parse ``scontrol -o show job <id>`` lines into per-task states.

    A pending range (``ArrayTaskId=2-5%2``) expands to one state per task. Lines of a non-array job give task 0.
    """
    states = []
    for line in text.splitlines():
        state = re.search(r"\bJobState=(\S+)", line)
        if state is None:
            continue
        exit_code = re.search(r"\bExitCode=(\d+):(\d+)", line)
        code = int(exit_code.group(1)) if exit_code else 0
        if exit_code and int(exit_code.group(2)):
            code = 128 + int(exit_code.group(2))  # killed by a signal, as a shell would report it
        tasks = re.search(r"\bArrayTaskId=(\S+)", line)
        ids = _task_ids(tasks.group(1)) if tasks else [0]
        states.extend(TaskState(i, state.group(1), code) for i in ids)
    return states


def _task_ids(spec: str) -> list[int]:
    ids: list[int] = []
    for part in spec.split("%", 1)[0].split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def array_task_states(job_id: str, env: Mapping[str, str] | None = None) -> dict[int, TaskState]:
    """Per-task states of job ``job_id`` from ``scontrol`` (finished jobs stay for MinJobAge seconds).

    Returns an empty dict when Slurm no longer knows the job.
    """
    proc = subprocess.run([slurm_command("scontrol", env), "-o", "show", "job", job_id],
                          env=None if env is None else dict(env), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {}
    return {s.task: s for s in parse_scontrol_jobs(proc.stdout)}


def queued_tasks(job_id: str, env: Mapping[str, str] | None = None) -> int:
    """Number of tasks of ``job_id`` still pending, running or completing (0 when all are done).

    Raises:
        SlurmError: squeue fails for another reason than an unknown (finished and purged) job.
    """
    proc = subprocess.run([slurm_command("squeue", env), "-h", "-r", "-j", job_id, "-o", "%i %T"],
                          env=None if env is None else dict(env), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return 0
        raise SlurmError(f"squeue -j {job_id} failed: {proc.stderr.strip()}")
    return len([line for line in proc.stdout.splitlines() if line.strip()])


def wait_for_job(
    job_id: str,
    *,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    on_poll: Callable[[int], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Block until no task of ``job_id`` is queued or running (requeued tasks count as queued).

    Args:
        on_poll: called with the number of unfinished tasks after every poll (progress output).

    Raises:
        TimeoutError: still unfinished after ``timeout_s`` seconds.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failures = 0
    while True:
        try:
            remaining = queued_tasks(job_id, env)
            failures = 0
        except SlurmError:
            # slurmctld can be briefly unreachable (restart, overload): only a persistent failure is an error.
            failures += 1
            if failures >= SQUEUE_RETRIES:
                raise
            logger.warning("squeue failed (%d/%d); retrying", failures, SQUEUE_RETRIES)
            time.sleep(poll_s)
            continue
        if on_poll is not None:
            on_poll(remaining)
        if remaining == 0:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Slurm job {job_id} still has {remaining} unfinished task(s) after {timeout_s}s")
        time.sleep(poll_s)
