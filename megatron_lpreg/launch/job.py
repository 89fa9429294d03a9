"""Inside a Slurm job: the steps the sbatch scripts delegate to Python (``python -m megatron_lpreg.launch.job``).

- ``array-task DIR``: run manifest row ``$SLURM_ARRAY_TASK_ID`` of array directory DIR as a child process,
  forwarding SIGUSR1/SIGUSR2/SIGTERM/SIGINT to it, then record its exit code in ``DIR/status/task_<i>.json``
  and exit with it (so :data:`~megatron_lpreg.launch.slurm.REQUEUE_EXIT_CODE` reaches the batch script).
- ``run-dir CONFIG [overrides]`` / ``run-dir --array-dir DIR``: the training run directory of this job or task.
- ``preempt RUN_DIR [--clear]``: ask the trainer writing RUN_DIR to checkpoint and exit with the requeue code
  (megatron_lpreg.rundir.request_preemption: a flag file rank 0 polls at every step boundary), or
  remove a stale request before the trainer starts.
- ``ray-env``: ``export`` lines with the Ray head node, IP, port and per-node GPUs/CPUs of this allocation, and a
  free port on this node for the Ray Client server (``MLPREG_RAY_CLIENT_PORT``).
- ``wait-ray --address A --nodes N``: block until N Ray nodes are alive (or fail after a timeout).
- ``requeue-code``: print REQUEUE_EXIT_CODE (the one definition the shell scripts use).
- ``preempt-file``: print the name of the preemption flag file (the batch shell's USR1 trap writes it itself:
  a Python start-up in the trap costs seconds under load, and a short run may end before the request lands).
- ``shell-env``: both of the above as ``export`` lines (``MLPREG_REQUEUE_CODE``, ``MLPREG_PREEMPT_FILE``): one
  Python start instead of two, which matters when each is a container step (slurm/common.sh, container mode).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_lpreg import rundir
from megatron_lpreg.launch.manifest import ArrayManifest, write_status
from megatron_lpreg.launch.slurm import REQUEUE_EXIT_CODE, SlurmError, SlurmJobEnv, ray_layout

logger = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def task_index(env: Mapping[str, str], explicit: int | None = None) -> int:
    """The array row to run: ``explicit`` if given, else ``SLURM_ARRAY_TASK_ID``.

    Raises:
        SlurmError: neither is available.
    """
    if explicit is not None:
        return explicit
    text = env.get("SLURM_ARRAY_TASK_ID", "")
    if not text.isdigit():
        raise SlurmError("SLURM_ARRAY_TASK_ID is not set: run inside an sbatch --array job or pass --task N")
    return int(text)


def resolve_task_argv(manifest: ArrayManifest, root: str | os.PathLike, index: int) -> list[str]:
    """Task ``index``'s argument vector, with eval checkpoint specs (``RUN@latest``) resolved to directories.

    Raises:
        FileNotFoundError: an eval task's checkpoint does not exist (yet).
    """
    argv = manifest.task_argv(root, index)
    if manifest.kind == "eval":
        argv = [str(rundir.resolve_checkpoint(a)) if i and argv[i - 1] == "--checkpoint" else a
                for i, a in enumerate(argv)]
    return argv


def run_forwarding_signals(argv: Sequence[str], *, cwd: str | None = None) -> int:
    """Run ``argv`` as a child, forwarding :data:`FORWARDED_SIGNALS` to it; return its exit code.

    A child killed by signal N returns 128 + N, as a shell reports it.
    """
    child = subprocess.Popen(list(argv), cwd=cwd)
    previous = {}

    def forward(signum: int, frame: object) -> None:
        logger.warning("forwarding %s to pid %d", signal.Signals(signum).name, child.pid)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        previous[sig] = signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def run_array_task(root: str | os.PathLike, env: Mapping[str, str], index: int | None = None,
                   extra: Sequence[str] = ()) -> int:
    """Run one task of the array in ``root`` and record its status; return the task's exit code.

    Args:
        extra: arguments appended last (the batch script's launcher overrides, e.g. trainer.launcher=ray).
    """
    root = Path(root).resolve()
    manifest = ArrayManifest.read(root)
    index = task_index(env, index)
    status = {
        "task": index, "job_id": env.get("SLURM_JOB_ID", ""), "array_job_id": env.get("SLURM_ARRAY_JOB_ID", ""),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "host": socket.gethostname(),
        "started": time.time(),
    }
    try:
        argv = resolve_task_argv(manifest, root, index)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("array task %d of %s cannot start: %s", index, root, exc)
        write_status(root, index, {**status, "exit_code": 2, "error": str(exc), "finished": time.time()})
        return 2
    argv.extend(extra)
    if manifest.kind == "train" and status["restart_count"] > 0:
        argv.append("trainer.resume=auto")  # a requeued task always resumes, whatever its config says
    manifest.task_dir(root, index).mkdir(parents=True, exist_ok=True)
    logger.info("array task %d/%d: %s", index, manifest.num_tasks, " ".join(argv))
    code = run_forwarding_signals(argv)
    write_status(root, index, {**status, "argv": argv, "exit_code": code, "finished": time.time(),
                               "requeue_requested": code == REQUEUE_EXIT_CODE})
    logger.info("array task %d exited with %d", index, code)
    return code


def training_run_dir(env: Mapping[str, str], config: str | None = None, overrides: Sequence[str] = (),
                     array_dir: str | None = None) -> Path:
    """The run directory the trainer of this job writes: ``trainer.output_dir`` of CONFIG + overrides (relative
    paths resolved against the current directory, as the trainer resolves them), or the array task's directory.

    Raises:
        ConfigError: the config does not load. ValueError: not a training array, or neither argument given.
    """
    if array_dir is not None:
        manifest = ArrayManifest.read(array_dir)
        if manifest.kind != "train":
            raise ValueError(f"{array_dir} is an {manifest.kind} array; only training tasks have a run directory")
        return manifest.task_dir(Path(array_dir).resolve(), task_index(env))
    if config is None:
        raise ValueError("run-dir needs CONFIG [overrides] or --array-dir DIR")
    from megatron_lpreg.config import RunConfig

    return Path(RunConfig.load(config, overrides).trainer.output_dir).resolve()


def request_preemption(run_dir: str | os.PathLike, clear: bool = False) -> None:
    """Ask the trainer writing ``run_dir`` to checkpoint and exit with REQUEUE_EXIT_CODE (or withdraw the ask).

    A file, not a signal: with srun, Ray or forked ranks a signal would reach either one process or every process
    of the step (reward workers included); the flag reaches rank 0 whatever the launcher.
    """
    if clear:
        rundir.clear_preemption(run_dir)
    else:
        rundir.request_preemption(run_dir)
        logger.warning("preemption requested for %s", run_dir)


def wait_for_ray(address: str, num_nodes: int, timeout_s: float, poll_s: float = 2.0) -> int:
    """Block until ``num_nodes`` Ray nodes are alive in the cluster at ``address``; return the count.

    Raises:
        TimeoutError: fewer nodes after ``timeout_s`` (names how many joined).
    """
    import ray

    deadline = time.monotonic() + timeout_s
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= num_nodes:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive}/{num_nodes} Ray nodes joined {address} within {timeout_s}s; "
                                   "check the worker logs and MLPREG_RAY_HEAD_IP in the site env")
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def free_port() -> int:
    """A TCP port that is free on this node now (the OS picks it), for a server started right after."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_lpreg.launch.job", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    task = sub.add_parser("array-task", help="run this array task's manifest row")
    task.add_argument("array_dir")
    task.add_argument("--task", type=int, default=None, help="row to run (default: $SLURM_ARRAY_TASK_ID)")
    task.add_argument("--extra", action="append", default=[], help="argument appended to the task's command")
    run_dir = sub.add_parser("run-dir", help="print the training run directory of this job or array task")
    run_dir.add_argument("config", nargs="?", default=None)
    run_dir.add_argument("overrides", nargs="*")
    run_dir.add_argument("--array-dir", default=None)
    preempt = sub.add_parser("preempt", help="ask the trainer in RUN_DIR to checkpoint and exit for requeue")
    preempt.add_argument("run_dir")
    preempt.add_argument("--clear", action="store_true", help="remove a pending request instead")
    sub.add_parser("ray-env", help="print export lines for the Ray head/worker bootstrap")
    wait = sub.add_parser("wait-ray", help="wait until N Ray nodes are alive")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("requeue-code", help="print the trainer's requeue exit code")
    sub.add_parser("preempt-file", help="print the name of the run directory's preemption flag file")
    sub.add_parser("shell-env", help="print export lines for the requeue code and the preemption flag file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.step == "array-task":
            return run_array_task(args.array_dir, os.environ, args.task, args.extra)
        if args.step == "run-dir":
            sys.stdout.write(f"{training_run_dir(os.environ, args.config, args.overrides, args.array_dir)}\n")
            return 0
        if args.step == "preempt":
            request_preemption(args.run_dir, args.clear)
            return 0
        if args.step == "ray-env":
            sys.stdout.write(ray_layout(SlurmJobEnv.from_environ(os.environ), os.environ).shell_exports())
            sys.stdout.write(f"export MLPREG_RAY_CLIENT_PORT={free_port()}\n")
            return 0
        if args.step == "wait-ray":
            alive = wait_for_ray(args.address, args.nodes, args.timeout)
            logger.info("Ray cluster at %s has %d node(s)", args.address, alive)
            return 0
        if args.step == "preempt-file":
            sys.stdout.write(f"{rundir.PREEMPT_FILE}\n")
            return 0
        if args.step == "shell-env":
            sys.stdout.write(f"export MLPREG_REQUEUE_CODE={REQUEUE_EXIT_CODE}\n"
                             f"export MLPREG_PREEMPT_FILE={shlex.quote(rundir.PREEMPT_FILE)}\n")
            return 0
        sys.stdout.write(f"{REQUEUE_EXIT_CODE}\n")
        return 0
    except (SlurmError, TimeoutError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
