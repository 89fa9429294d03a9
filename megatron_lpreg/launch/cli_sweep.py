"""``megatron-lpreg sweep CONFIG --grid algo.rho=0.005,0.01 --grid seed=1,2,3 [overrides] [--max-parallel K]``.

Writes a sweep directory (manifest.txt: one line of overrides per task), validates every task's config with
``RunConfig.load`` *before* submitting, then submits one ``sbatch --array=0-(N-1)%K slurm/sweep_array.sbatch``.
Task ``i`` trains into ``<sweep dir>/task_<i>``. See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.config.base import parse_override
from megatron_lpreg.launch.manifest import ArrayManifest, SweepSpec, load_sweep_file, parse_grid
from megatron_lpreg.launch.slurm import SlurmError
from megatron_lpreg.launch.submit import (
    IntermixedParser,
    add_submit_arguments,
    default_array_dir,
    prepare_array_dir,
    submit_array,
)

OUTPUT_KEY = "trainer.output_dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = IntermixedParser
    parser.add_argument("config", help="training YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every task")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="swept key and its values; several --grid give the cartesian product")
    parser.add_argument("--sweep", dest="sweep_file", default=None,
                        help="sweep file (configs/sweeps/*.yaml: overrides, grid, rows); --grid axes are added")
    parser.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<config>-<time>)")
    add_submit_arguments(parser, "mlpreg-sweep")
    parser.epilog = ("Task i runs: python -m megatron_lpreg train CONFIG <overrides> <row i> "
                     "trainer.output_dir=<dir>/task_i")


def build_sweep(config: str, overrides: list[str], grids: list[str], sweep_file: str | None) -> SweepSpec:
    """Combine the sweep file, the common overrides and the --grid axes; validate their syntax.

    Raises:
        ConfigError: bad grid/override syntax, an empty sweep, clashing keys, or trainer.output_dir set by hand.
    """
    spec = load_sweep_file(sweep_file) if sweep_file else SweepSpec()
    for text in overrides:
        parse_override(text)
    spec.overrides = [*spec.overrides, *overrides]
    spec.axes = [*spec.axes, *(parse_grid(text) for text in grids)]
    tasks = spec.tasks()
    for text in [*spec.overrides, *(o for task in tasks for o in task)]:
        if parse_override(text)[0] == OUTPUT_KEY:
            raise ConfigError(f"{OUTPUT_KEY} is set by the sweep (one directory per task); remove '{text}'")
    return spec


def validate_tasks(config: str, spec: SweepSpec) -> list[list[str]]:
    """Load every task's full config (file + common + row overrides) with RunConfig.load; return the tasks.

    Raises:
        ConfigError: the first task whose config is invalid, naming the task and its overrides.
    """
    tasks = spec.tasks()
    for index, task in enumerate(tasks):
        try:
            RunConfig.load(config, [*spec.overrides, *task, f"{OUTPUT_KEY}=/dev/null/task_{index}"])
        except ConfigError as exc:
            raise ConfigError(f"sweep task {index} ({' '.join(task) or 'no overrides'}): {exc}") from exc
    return tasks


def run(args: argparse.Namespace) -> int:
    try:
        spec = build_sweep(args.config, args.overrides, args.grid, args.sweep_file)
        tasks = validate_tasks(args.config, spec)
        root = prepare_array_dir(args.out or default_array_dir("sweeps", Path(args.config).stem))
        manifest = ArrayManifest(
            kind="train",
            command=[sys.executable, "-m", "megatron_lpreg", "train", str(Path(args.config).resolve()),
                     *spec.overrides],
            tasks=tasks,
            task_args=[f"{OUTPUT_KEY}={{task_dir}}"],
            meta={"config": str(Path(args.config).resolve()), "grid_keys": [a.key for a in spec.axes],
                  "overrides": spec.overrides},
        )
        return submit_array(manifest, root, "sweep_array.sbatch", args)
    except (ConfigError, SlurmError, ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
