"""``megatron-lpreg eval-array RUN_DIR [RUN_DIR ...] --benchmarks aime24,math500 [--dependency afterok:<id>]``.

One array task per (checkpoint x benchmark), each running
``python -m megatron_lpreg eval --checkpoint C --benchmarks B [--eval-arg ...] --out <array dir>/task_<i>``.
A RUN_DIR may also be a sweep directory (every task's run is evaluated). With ``--checkpoints latest`` (default)
the checkpoint is resolved when the task starts, so the array can be submitted before training has finished.

Every task runs on one node with the eval layout (``eval.engine_tp`` x ``eval.num_engines``, not the training run's
engines; :mod:`megatron_lpreg.eval.layout`). With ``--gpus-per-node G`` the layout of every run config found (its
``config.yaml`` plus the dotted ``--eval-arg`` overrides) is checked before submission and the job asks for G GPUs.
The tasks of one checkpoint share one HF export, written by the first into ``<step dir>/hf_export``
(:mod:`megatron_lpreg.eval.hf_cache`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.eval.layout import plan_eval_layout
from megatron_lpreg.launch.manifest import ArrayManifest
from megatron_lpreg.launch.slurm import SlurmError
from megatron_lpreg.launch.submit import (
    IntermixedParser,
    add_submit_arguments,
    default_array_dir,
    prepare_array_dir,
    submit_array,
)
from megatron_lpreg.rundir import CONFIG_FILE, LATEST_SUFFIX, checkpoint_step, list_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = IntermixedParser
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="training run directories (or sweep directories, meaning all their tasks)")
    parser.add_argument("--benchmarks", required=True,
                        help="comma-separated benchmarks, one array task each (e.g. aime24,aime25,math500)")
    parser.add_argument("--checkpoints", default="latest",
                        help="latest (resolved at task start), all (existing now), or steps like 40,80")
    parser.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `megatron-lpreg eval`, repeatable (--eval-arg=--samples=16)")
    parser.add_argument("--out", default=None, help="array directory (default runs/evals/<run>-<time>)")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                        help="GPUs of the eval node: check each run's eval layout (eval.engine_tp x eval.num_engines) "
                             "against G before submitting, and ask sbatch for G GPUs")
    add_submit_arguments(parser, "mlpreg-eval")


def expand_run_dirs(run_dirs: list[str], *, may_not_exist_yet: bool = False) -> list[Path]:
    """Run directories, with a sweep directory replaced by its task directories (in task order).

    Args:
        may_not_exist_yet: accept a missing directory (the array waits on the job that will create it).

    Raises:
        ValueError: a path does not exist (and ``may_not_exist_yet`` is False).
    """
    runs: list[Path] = []
    for text in run_dirs:
        path = Path(text).resolve()
        if not path.is_dir():
            if may_not_exist_yet:
                runs.append(path)
                continue
            raise ValueError(f"run directory not found: {path} (to evaluate a run that has not started yet, "
                             "pass --dependency afterok:<train job id> with --checkpoints latest)")
        if (path / "array.json").is_file():
            manifest = ArrayManifest.read(path)
            if manifest.kind != "train":
                raise ValueError(f"{path} is an eval array, not a training run or sweep")
            runs.extend(manifest.task_dir(path, i) for i in range(manifest.num_tasks))
        else:
            runs.append(path)
    return runs


def checkpoint_specs(run: Path, which: str) -> list[str]:
    """Checkpoint arguments for one run: ``RUN@latest``, every existing checkpoint, or the listed steps.

    Raises:
        ValueError: ``all``/steps with no such checkpoint on disk, or a malformed ``which``.
    """
    if which == "latest":
        return [f"{run}{LATEST_SUFFIX}"]
    existing = list_checkpoints(run)
    if which == "all":
        if not existing:
            raise ValueError(f"--checkpoints all: no checkpoint under {run}/checkpoints yet "
                             "(to evaluate a run that is still training, use --checkpoints latest with --dependency)")
        return [str(p) for p in existing]
    try:
        steps = [int(s) for s in which.split(",")]
    except ValueError:
        raise ValueError(f"--checkpoints={which!r}: expected latest, all or comma-separated steps") from None
    by_step = {checkpoint_step(p): p for p in existing}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise ValueError(f"--checkpoints: step(s) {missing} not in {run}/checkpoints (have {sorted(by_step)})")
    return [str(by_step[s]) for s in steps]


def build_tasks(runs: list[Path], benchmarks: list[str], which: str) -> list[list[str]]:
    """The (checkpoint x benchmark) rows, checkpoint slowest.

    Raises:
        ValueError: no benchmark, an empty name, or see :func:`checkpoint_specs`.
    """
    if not benchmarks or any(not b for b in benchmarks):
        raise ValueError(f"--benchmarks must list benchmark names separated by commas, got {benchmarks}")
    tasks = [["--checkpoint", spec, "--benchmarks", bench]
             for run in runs for spec in checkpoint_specs(run, which) for bench in benchmarks]
    if not tasks:
        raise ValueError("empty eval array: no run directory given")
    return tasks


def check_eval_layouts(runs: list[Path], eval_args: list[str], gpus_per_node: int) -> list[str]:
    """The eval layout of every run whose ``config.yaml`` exists (a run not started yet is checked by its task),
    with the dotted overrides among ``eval_args`` applied; one summary line per run.

    Raises:
        ConfigError: a layout does not fit one node of ``gpus_per_node`` GPUs (naming the run and the keys).
    """
    overrides = [a for a in eval_args if "=" in a and not a.startswith("-")]
    lines = []
    for run in runs:
        config = run / CONFIG_FILE
        if not config.is_file():
            continue
        cfg = RunConfig.load(config, overrides)
        try:
            lines.append(f"{run.name}: {plan_eval_layout(cfg.eval, cfg.rollout, gpus_per_node).summary()}")
        except ConfigError as exc:
            raise ConfigError(f"{run}: {exc} (pass it with --eval-arg=eval.num_engines=N)") from None
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        runs = expand_run_dirs(args.run_dirs,
                               may_not_exist_yet=bool(args.dependency) and args.checkpoints == "latest")
        benchmarks = [b.strip() for b in args.benchmarks.split(",")]
        tasks = build_tasks(runs, benchmarks, args.checkpoints)
        if args.gpus_per_node is not None:
            for line in check_eval_layouts(runs, list(args.eval_arg), args.gpus_per_node):
                print(f"# {line}", file=sys.stderr)
            args.sbatch_arg = [f"--gpus-per-node={args.gpus_per_node}", *args.sbatch_arg]
        root = prepare_array_dir(args.out or default_array_dir("evals", runs[0].name))
        manifest = ArrayManifest(
            kind="eval",
            command=[sys.executable, "-m", "megatron_lpreg", "eval", *args.eval_arg],
            tasks=tasks,
            task_args=["--out", "{task_dir}"],
            meta={"runs": [str(r) for r in runs], "benchmarks": benchmarks, "checkpoints": args.checkpoints},
        )
        return submit_array(manifest, root, "eval_array.sbatch", args)
    except (SlurmError, ValueError, TimeoutError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
