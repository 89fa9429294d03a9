"""Job-array manifests: the grid of overrides of a sweep, or the (checkpoint x benchmark) list of an eval array.

An array directory holds

- ``manifest.txt``: one line per task, the task's own arguments (for a sweep: its dotted overrides, e.g.
  ``algo.rho=0.005 seed=1``), shell-quoted; line ``i`` is what ``SLURM_ARRAY_TASK_ID=i`` runs;
- ``array.json``: what the lines are appended to (``command``), the per-task directory arguments
  (``task_args``, with ``{task_dir}`` filled in), the kind, and the Slurm job id once submitted;
- ``task_<i>/``: each task's own output (a training run directory, or an eval output directory);
- ``status/task_<i>.json``: exit code and timing written by :mod:`megatron_lpreg.launch.job`;
- ``logs/%x-%A_%a.out``: Slurm's log of each task.

The mapping from task id to arguments happens in Python (:meth:`ArrayManifest.task_argv`), never in bash.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_lpreg.config.base import ConfigError, parse_override

MANIFEST_FILE = "manifest.txt"
ARRAY_FILE = "array.json"
STATUS_DIR = "status"
LOG_DIR = "logs"


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid key=v1,v2`` axis: a dotted config key and its values as override text."""

    key: str
    values: tuple[str, ...]

    def overrides(self) -> list[str]:
        return [f"{self.key}={value}" for value in self.values]


def parse_grid(text: str) -> GridAxis:
    """Parse ``algo.rho=0.005,0.01`` into a :class:`GridAxis`.

    Values are split on ',' (a value that itself holds a comma, such as a list, needs a sweep file).

    Raises:
        ConfigError: no '=', an empty key or key segment, an empty value, or a repeated value.
    """
    if "=" not in text:
        raise ConfigError(f"--grid '{text}' must look like dotted.key=v1,v2 (e.g. algo.rho=0.005,0.01)")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not segment for segment in key.split(".")):
        raise ConfigError(f"--grid '{text}' has an empty key or key segment")
    values = tuple(value.strip() for value in raw.split(","))
    if not raw.strip() or any(not value for value in values):
        raise ConfigError(f"--grid '{text}' has an empty value; give comma-separated values like {key}=1,2")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"--grid '{text}' repeats value(s) {repeated}; each task must differ")
    for value in values:
        parse_override(f"{key}={value}")  # the value must parse as YAML, exactly as the trainer will parse it
    return GridAxis(key, values)


def override_text(key: str, value: Any) -> str:
    """``key=value`` with ``value`` written so that the YAML override parser reads back the same value."""
    if isinstance(value, str):
        return f"{key}={value}"
    if isinstance(value, float):
        return f"{key}={_yaml_float(value)}"
    return f"{key}={json.dumps(value)}"  # JSON is YAML: 3, true, null, [1, 2], {"a": 1}


def _yaml_float(value: float) -> str:
    # YAML 1.1 (PyYAML) reads "1e-06" as a string; it needs a '.' in the mantissa ("1.0e-06").
    if math.isnan(value) or math.isinf(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


@dataclass(kw_only=True)
class SweepSpec:
    """A sweep: common overrides, grid axes (cartesian product) and explicit rows (each a list of overrides)."""

    axes: list[GridAxis] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    """Applied to every task, before the task's own overrides."""

    def tasks(self) -> list[list[str]]:
        """Every task's own overrides: each row (or one empty row) x the grid product, first axis slowest.

        Raises:
            ConfigError: the sweep has no task, a key appears in two axes, or a task sets a key twice or sets
                a common override's key.
        """
        if not self.axes and not self.rows:
            raise ConfigError(
                "empty sweep: give at least one --grid key=v1,v2 (or a sweep file with 'grid:' or 'rows:')"
            )
        keys = [axis.key for axis in self.axes]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"--grid keys repeat: {keys}; give each key once with all its values")
        common = {parse_override(text)[0] for text in self.overrides}
        grid_points = [list(point) for point in itertools.product(*(axis.overrides() for axis in self.axes))]
        tasks = [row + point for row in (self.rows or [[]]) for point in grid_points]
        for task in tasks:
            task_keys = [parse_override(text)[0] for text in task]
            if len(set(task_keys)) != len(task_keys):
                raise ConfigError(f"sweep task {task} sets a key twice; a grid key must not also be in a row")
            clash = common.intersection(task_keys)
            if clash:
                raise ConfigError(
                    f"sweep key(s) {sorted(clash)} are both swept and given as a common override; drop one"
                )
        if not tasks:
            raise ConfigError("empty sweep: the grid and rows give no task")
        return tasks


def load_sweep_file(path: str | os.PathLike) -> SweepSpec:
    """Read a ``configs/sweeps/*.yaml`` file: ``overrides`` (mapping or list), ``grid`` (key -> list of values)
    and ``rows`` (list of mappings); see configs/sweeps/README.md.

    Raises:
        ConfigError: missing file, unknown top-level key, or a section of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    allowed = {"overrides", "grid", "rows", "description"}
    if not isinstance(data, dict) or set(data) - allowed:
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {sorted(allowed)}, got {data!r:.200}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map dotted keys to non-empty lists of values")
    rows = data.get("rows") or []
    if not isinstance(rows, list) or any(not isinstance(row, dict) or not row for row in rows):
        raise ConfigError(f"{path}: 'rows' must be a list of non-empty mappings of dotted key -> value")
    overrides = data.get("overrides") or {}
    if isinstance(overrides, dict):
        overrides = [override_text(k, v) for k, v in overrides.items()]
    elif not isinstance(overrides, list):
        raise ConfigError(f"{path}: 'overrides' must be a mapping or a list of key=value strings")
    axes = []
    for key, values in grid.items():
        texts = tuple(override_text(key, v).split("=", 1)[1] for v in values)
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{path}: grid key {key} repeats a value: {list(values)}")
        axes.append(GridAxis(str(key), texts))
    return SweepSpec(
        axes=axes,
        rows=[[override_text(k, v) for k, v in row.items()] for row in rows],
        overrides=[str(o) for o in overrides],
    )


@dataclass(kw_only=True)
class ArrayManifest:
    """What every task of one job array runs. Task ``i`` runs ``command + tasks[i] + task_args(task_dir)``."""

    kind: Literal["train", "eval"]
    command: list[str]
    """Argument vector shared by all tasks (interpreter, module, subcommand, config, common overrides)."""
    tasks: list[list[str]]
    """Each task's own arguments (one manifest line each)."""
    task_args: list[str] = field(default_factory=list)
    """Appended last, with ``{task_dir}`` replaced by the task's directory (e.g. trainer.output_dir={task_dir})."""
    job_id: str = ""
    """Slurm array job id once submitted."""
    sbatch: list[str] = field(default_factory=list)
    """The sbatch command line used (or printed by --dry-run)."""
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for collect (config path, grid keys, run dirs evaluated)."""

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @staticmethod
    def task_dir(root: str | os.PathLike, index: int) -> Path:
        return Path(root) / f"task_{index}"

    @staticmethod
    def status_path(root: str | os.PathLike, index: int) -> Path:
        return Path(root) / STATUS_DIR / f"task_{index}.json"

    def task_argv(self, root: str | os.PathLike, index: int) -> list[str]:
        """The full argument vector of task ``index``.

        Raises:
            ValueError: ``index`` is outside ``0..num_tasks-1``.
        """
        if not 0 <= index < self.num_tasks:
            raise ValueError(f"array task {index} does not exist: {root} has tasks 0..{self.num_tasks - 1}")
        task_dir = str(self.task_dir(Path(root).resolve(), index))
        return [*self.command, *self.tasks[index], *(arg.format(task_dir=task_dir) for arg in self.task_args)]

    def write(self, root: str | os.PathLike) -> None:
        """Write ``manifest.txt`` and ``array.json`` (atomically each) and create ``logs/`` and ``status/``."""
        root = Path(root)
        for sub in (LOG_DIR, STATUS_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _atomic_write(root / MANIFEST_FILE, "".join(shlex.join(task) + "\n" for task in self.tasks))
        record = {k: v for k, v in asdict(self).items() if k != "tasks"}
        _atomic_write(root / ARRAY_FILE, json.dumps(record, indent=2) + "\n")

    @classmethod
    def read(cls, root: str | os.PathLike) -> ArrayManifest:
        """Load an array directory written by :meth:`write`.

        Raises:
            ValueError: missing or inconsistent files.
        """
        root = Path(root)
        if not (root / ARRAY_FILE).is_file() or not (root / MANIFEST_FILE).is_file():
            raise ValueError(f"{root} is not a job-array directory (no {ARRAY_FILE} / {MANIFEST_FILE})")
        record = json.loads((root / ARRAY_FILE).read_text())
        lines = (root / MANIFEST_FILE).read_text().splitlines()
        return cls(tasks=[shlex.split(line) for line in lines], **record)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_status(root: str | os.PathLike, index: int) -> dict[str, Any] | None:
    """A task's ``status/task_<i>.json`` (exit code, restarts, times), or None if it never finished."""
    path = ArrayManifest.status_path(root, index)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_status(root: str | os.PathLike, index: int, status: dict[str, Any]) -> None:
    path = ArrayManifest.status_path(root, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(status, indent=2) + "\n")


def manifest_lines(root: str | os.PathLike) -> Sequence[str]:
    """The raw lines of ``manifest.txt`` (for display)."""
    return (Path(root) / MANIFEST_FILE).read_text().splitlines()
