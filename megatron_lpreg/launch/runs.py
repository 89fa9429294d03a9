"""Reading run directories written by ``megatron-lpreg train``: checkpoints and metrics.

Layout (megatron_lpreg/trainer/state.py): ``<run>/checkpoints/step_<7-digit step>/`` plus a ``latest`` pointer file
holding the name of the newest complete checkpoint; ``<run>/metrics.jsonl`` holds one JSON object per step.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST_POINTER = "latest"
LATEST_SUFFIX = "@latest"
"""A checkpoint spec ``<run_dir>@latest`` is resolved when the eval task starts, not at submission time, so an
eval array can be submitted with ``--dependency afterok:<train job>`` before the checkpoint exists."""

_STEP = re.compile(r"(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step number at the end of a checkpoint directory name (``step_0000040`` -> 40), else None."""
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (directories under ``checkpoints/`` named ``*_<step>``)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None
             and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint the ``latest`` pointer names (else the highest step).

    Raises:
        FileNotFoundError: the run has no checkpoint, or the pointer names a missing directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
        return path
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root} (did training finish and save?)")
    return found[-1]


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint directory, or ``<run_dir>@latest`` resolved now.

    Raises:
        FileNotFoundError: the directory does not exist or the run has no checkpoint.
    """
    if spec.endswith(LATEST_SUFFIX):
        return latest_checkpoint(spec[: -len(LATEST_SUFFIX)])
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return path
