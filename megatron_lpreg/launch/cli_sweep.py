"""``megatron-lpreg sweep CONFIG --grid algo.rho=0.005,0.01 --grid seed=1,2,3 [overrides] [--max-parallel K]``.

Writes a sweep directory (manifest.txt: one line of overrides per task), validates every task's config with
``RunConfig.load`` *before* submitting, then submits one ``sbatch --array=0-(N-1)%K slurm/sweep_array.sbatch``.
Task ``i`` trains into ``<sweep dir>/task_<i>``. See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import re
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
_SCHEME = re.compile(r"^[a-z][a-z0-9_]*:(?!//)")
"""A value such as ``tiny:0`` or ``synthetic:addition``: a built-in source, not a path."""


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


def missing_inputs(cfg: RunConfig, cwd: Path) -> list[str]:
    """The model and data paths of ``cfg`` that do not exist, resolved against ``cwd`` as the task will resolve
    them (its working directory is the submission directory): model.hf_path, model.mcore_path, data.source and,
    when a named benchmark is evaluated, eval.data_dir. Built-in sources (``tiny:0``, ``synthetic:addition``) and
    empty values are not paths. Returns one ``key=value (absolute path)`` text per missing path."""
    inputs = {"model.hf_path": cfg.model.hf_path, "model.mcore_path": cfg.model.mcore_path,
              "data.source": cfg.data.source}
    named = [b for b in cfg.eval.benchmarks if b != "synthetic" and "=" not in b]
    if named and cfg.eval.data_dir:
        inputs["eval.data_dir"] = cfg.eval.data_dir
    for entry in cfg.eval.benchmarks:
        if "=" in entry:
            inputs[f"eval.benchmarks[{entry.split('=', 1)[0]}]"] = entry.split("=", 1)[1]
    missing = []
    for key, value in inputs.items():
        if value and not _SCHEME.match(value) and not (cwd / value).exists():
            missing.append(f"{key}={value} ({(cwd / value).resolve()})")
    return missing


def validate_tasks(config: str, spec: SweepSpec, cwd: Path | None = None) -> list[list[str]]:
    """Load every task's full config (file + common + row overrides) with RunConfig.load and check that its model
    and data paths exist (:func:`missing_inputs`); return the tasks.

    Raises:
        ConfigError: the first task whose config is invalid or names a missing path, naming the task, its
            overrides, the keys and the paths.
    """
    cwd = Path.cwd() if cwd is None else cwd
    tasks = spec.tasks()
    for index, task in enumerate(tasks):
        where = f"sweep task {index} ({' '.join(task) or 'no overrides'})"
        try:
            cfg = RunConfig.load(config, [*spec.overrides, *task, f"{OUTPUT_KEY}=/dev/null/task_{index}"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        missing = missing_inputs(cfg, cwd)
        if missing:
            raise ConfigError(f"{where}: not found: {'; '.join(missing)}. Relative paths are resolved against the "
                              f"directory you submit from ({cwd}), the tasks' working directory; create them, or "
                              f"give absolute paths")
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
