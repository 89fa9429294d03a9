"""Submitting a job array directory, waiting for it, and telling which tasks failed (shared by sweep/eval-array)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from megatron_lpreg.launch.manifest import LOG_DIR, ArrayManifest, read_status
from megatron_lpreg.launch.slurm import (
    REQUEUE_EXIT_CODE,
    SbatchRequest,
    TaskState,
    array_spec,
    array_task_states,
    check_dependency,
    scripts_dir,
    site_environment,
    submit,
    wait_for_job,
)


class IntermixedParser(argparse.ArgumentParser):
    """Lets dotted overrides (positional) and options interleave: ``CONFIG --grid a=1,2 x=1 --wait y=2``.

    The top-level parser calls the subcommand parser's ``parse_known_args``; this routes it through argparse's
    intermixed parsing, which itself calls ``parse_known_args`` (hence the re-entrancy flag).
    """

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_submit_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Options every array submitter shares."""
    parser.add_argument("--max-parallel", type=int, default=None, metavar="K",
                        help="run at most K tasks at once (--array=0-(N-1)%%K)")
    parser.add_argument("--dependency", default="", help="Slurm dependency, e.g. afterok:<jobid>")
    parser.add_argument("--job-name", default=default_name,
                        help=f"Slurm job name, the %%x of logs (default {default_name})")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                        help="extra sbatch option, repeatable: --sbatch-arg=--time=2:00:00 --sbatch-arg=--gpus=8")
    parser.add_argument("--site-env", default=os.environ.get("MLPREG_SITE_ENV", ""),
                        help="site env file (partition, account, modules, container; default $MLPREG_SITE_ENV)")
    parser.add_argument("--wait", action="store_true", help="wait for all tasks; exit 1 if any failed")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    parser.add_argument("--poll", type=float, default=5.0, help="with --wait: seconds between squeue polls")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the array directory and print the sbatch command without submitting")


@dataclass(frozen=True)
class TaskOutcome:
    """How one array task ended, from its status file and (when Slurm still knows it) the scheduler."""

    task: int
    state: str
    exit_code: int | None
    log: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def task_outcomes(root: Path, manifest: ArrayManifest, states: Mapping[int, TaskState]) -> list[TaskOutcome]:
    """Combine ``status/task_<i>.json`` (the task's own exit code) with the scheduler's states.

    A task without a status file never ran to completion (cancelled, dependency never satisfied, killed, node
    failure): its outcome is the scheduler state, or MISSING when Slurm has forgotten the job.
    """
    outcomes = []
    for index in range(manifest.num_tasks):
        status = read_status(root, index)
        sched = states.get(index)
        log = _log_path(root, manifest, index)
        if status is not None and status.get("exit_code") != REQUEUE_EXIT_CODE:
            code = int(status["exit_code"])
            state = "COMPLETED" if code == 0 else (sched.state if sched and sched.state != "COMPLETED" else "FAILED")
            outcomes.append(TaskOutcome(index, state, code, log))
        else:
            outcomes.append(TaskOutcome(index, sched.state if sched else "MISSING", None, log))
    return outcomes


def _log_path(root: Path, manifest: ArrayManifest, index: int) -> str:
    name = manifest.meta.get("job_name", "*")
    return str(root / LOG_DIR / f"{name}-{manifest.job_id or '*'}_{index}.out")


def build_request(manifest: ArrayManifest, root: Path, script: str, args: argparse.Namespace) -> SbatchRequest:
    """The sbatch command for array directory ``root`` (validates --max-parallel and --dependency).

    Raises:
        ValueError: bad --max-parallel / --dependency, or an empty array.
        SlurmError: the slurm/ scripts cannot be found.
    """
    export = {"MLPREG_ROOT": str(scripts_dir().parent), "MLPREG_PYTHON": sys.executable}
    if args.site_env:
        export["MLPREG_SITE_ENV"] = str(Path(args.site_env).resolve())
    return SbatchRequest(
        script=scripts_dir() / script,
        script_args=[str(root)],
        job_name=args.job_name,
        output=str(root / LOG_DIR / "%x-%A_%a.out"),
        array=array_spec(manifest.num_tasks, args.max_parallel),
        dependency=check_dependency(args.dependency) if args.dependency else "",
        export=export,
        extra_args=list(args.sbatch_arg),
    )


def submit_array(manifest: ArrayManifest, root: Path, script: str, args: argparse.Namespace) -> int:
    """Write ``root``, submit (or print with --dry-run), optionally wait; return the CLI exit code.

    stdout: the sbatch command (dry run) or the job id, a per-task table after --wait, and the array directory
    as the last line.

    Raises:
        ValueError, SlurmError: bad options, Slurm missing or sbatch refusing the job.
    """
    request = build_request(manifest, root, script, args)
    manifest.sbatch = request.argv()
    manifest.meta["job_name"] = args.job_name
    manifest.write(root)
    if args.dry_run:
        print(shlex.join(manifest.sbatch))
        print(root)
        return 0
    env = dict(os.environ)
    if args.site_env:
        env.update(site_environment(args.site_env, env))
    manifest.job_id = submit(request, env)
    manifest.write(root)
    print(f"submitted job array {manifest.job_id} ({manifest.num_tasks} task(s)); logs in {root / LOG_DIR}",
          flush=True)
    if not args.wait:
        print(root)
        return 0
    last = [-1]

    def progress(remaining: int) -> None:  # one line per change, not per poll
        if remaining != last[0]:
            print(f"  {remaining} task(s) queued or running", file=sys.stderr, flush=True)
            last[0] = remaining

    wait_for_job(manifest.job_id, poll_s=args.poll, timeout_s=args.timeout, env=env, on_poll=progress)
    outcomes = task_outcomes(root, manifest, array_task_states(manifest.job_id, env))
    for outcome, line in zip(outcomes, (shlex.join(t) for t in manifest.tasks)):
        code = "-" if outcome.exit_code is None else outcome.exit_code
        print(f"task {outcome.task}: {outcome.state} (exit {code}) {line}")
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"task {outcome.task} failed; log: {outcome.log}", file=sys.stderr)
    print(root)
    return 1 if failed else 0


def default_array_dir(kind: str, stem: str) -> Path:
    """``runs/<kind>/<stem>-<UTC time>`` under the current directory."""
    import time

    return Path("runs") / kind / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def prepare_array_dir(out: str | os.PathLike) -> Path:
    """Absolute array directory; refuses one that already holds an array (a resubmission would mix tasks).

    Raises:
        ValueError: ``out`` already holds array.json.
    """
    root = Path(out).resolve()
    if (root / "array.json").exists():
        raise ValueError(f"{root} already holds a job array; pass a new --out directory")
    root.mkdir(parents=True, exist_ok=True)
    return root
