"""Logging setup, metric sinks and progress bars (usable from any module).

``setup(rank, world_size)`` once per process: time, level and ``[rank r/w]`` in every line; only rank 0 logs INFO
unless ``all_ranks``. Metrics are flat dicts with namespaced keys (``loss/...``, ``reward/...``, ``perf/...``);
:class:`MetricSinks` writes them to stdout, ``metrics.jsonl`` and optionally TensorBoard / W&B.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from megatron_lpreg.rundir import METRICS_FILE, rewrite_jsonl, wandb_run_id

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world_size: int, all_ranks: bool) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world_size}]"
        self.all_ranks = all_ranks
        self.quiet = rank != 0 and not all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return not (self.quiet and record.levelno < logging.WARNING)


# Harmless on CPU / with the local spec; they would otherwise repeat on every rank of every run.
_KNOWN_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*full scope is deprecated.*",
    r".*all_gather_into_tensor. is deprecated.*",
    r".*Converting a tensor with requires_grad=True to a scalar.*",
)


def quiet_known_warnings() -> None:
    """Silence the known-harmless megatron/torch warnings listed in ``_KNOWN_WARNINGS``."""
    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so that a handler set up under a replaced stderr (a
    test's capture, a notebook cell) does not keep writing to that stream after it is closed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(rank: int = 0, world_size: int = 1, *, level: str = "INFO", all_ranks: bool = False,
          log_file: str | os.PathLike | None = None) -> None:
    """Configure the root logger for this process (idempotent: replaces our previous handlers)."""
    quiet_known_warnings()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mlpreg", False):
            root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(rank_prefix)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [_StderrHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(_RankFilter(rank, world_size, all_ranks))
        handler._mlpreg = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("megatron", "torch.distributed", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def set_rank(rank: int, world_size: int) -> None:
    """In a forked rank: re-label our handlers with this rank (rank > 0 then logs WARNING+ unless all_ranks)."""
    for handler in logging.getLogger().handlers:
        for flt in handler.filters:
            if isinstance(flt, _RankFilter):
                handler.removeFilter(flt)
                handler.addFilter(_RankFilter(rank, world_size, flt.all_ranks))


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True,
             rank: int = 0) -> Iterator[T]:
    """A tqdm bar on rank 0 when stderr is a TTY; the plain iterable otherwise."""
    if not enabled or rank != 0 or not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def wandb_init_kwargs(run_dir: str | os.PathLike, *, project: str, run_name: str = "",
                      config: dict | None = None) -> dict[str, Any]:
    """``wandb.init`` arguments for ``run_dir``: the run id kept in the run dir (:func:`rundir.wandb_run_id`) with
    ``resume="allow"``, so a requeued attempt continues the same W&B run (steps it redoes after its checkpoint
    are below W&B's last step, and W&B keeps the first attempt's values for them; metrics.jsonl has the redone
    ones)."""
    run_dir = Path(run_dir)
    return {"project": project, "name": run_name or run_dir.name, "dir": str(run_dir), "config": config or {},
            "id": wandb_run_id(run_dir), "resume": "allow"}


class MetricSinks:
    """Write per-step metric dicts to metrics.jsonl (+ TensorBoard / W&B when enabled). Rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "megatron_lpreg", run_name: str = "", config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_mod  # optional; offline unless WANDB_MODE says otherwise

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb_mod.init(**wandb_init_kwargs(self.run_dir, project=wandb_project,
                                                             run_name=run_name, config=config))

    def truncate_after(self, step: int) -> None:
        """Drop lines with step >= ``step`` (a resumed run rewrites the steps after its checkpoint)."""
        self._file.close()
        rewrite_jsonl(self.path, lambda row: row.get("step", -1) < step)  # torn lines from a killed run go too
        self._file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int, *, jsonl: bool = True) -> None:
        """One row; ``jsonl=False`` sends it to TensorBoard / W&B only (evaluations keep their own eval.jsonl)."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if jsonl:
            self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn trailing line (a run killed mid-write) is skipped; missing file -> []."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (one per step)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)
