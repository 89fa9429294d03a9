"""The run directory's layout, and reading it: checkpoints, the ``latest`` pointer, metrics and eval rows.

This module is the one owner of the layout; the trainer (``trainer/state.py``) and the launchers import it::

    <run>/config.yaml          resolved config
    <run>/metrics.jsonl        one JSON object per completed step ({"step": s, ...}, s = 0, 1, ...)
    <run>/eval.jsonl           one JSON object per held-out evaluation ({"step": s, ...}: after s steps)
    <run>/checkpoints/step_<7-digit step>/   complete checkpoints (``manifest.json`` inside; models/checkpoint.py)
    <run>/checkpoints/latest   the name of the newest complete checkpoint, replaced atomically after it is written
    <run>/checkpoints/.step_<N>.tmp-<id>/    a save in progress (or killed); never a checkpoint
    <run>/checkpoints/.set_aside/            checkpoints a resume found newer than the newest complete one
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

CHECKPOINTS = "checkpoints"
LATEST_POINTER = "latest"
SET_ASIDE = ".set_aside"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
MANIFEST_FILE = "manifest.json"
"""Written last into a checkpoint's temp dir (``models.checkpoint.MANIFEST``, kept equal by a test)."""
LATEST_SUFFIX = "@latest"
"""A checkpoint spec ``<run_dir>@latest`` is resolved when the eval task starts, not at submission time, so an
eval array can be submitted with ``--dependency afterok:<train job>`` before the checkpoint exists."""

_STEP = re.compile(r"(\d+)$")


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` completed steps (``step_0000040``)."""
    return f"step_{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step number at the end of a checkpoint directory name (``step_0000040`` -> 40), else None."""
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first: visible directories under ``checkpoints/`` named
    ``*_<step>``. Hidden ones (a save's temp dir ``.step_N.tmp-<id>``, set-aside copies) never count; whether a
    listed one is complete is for :func:`megatron_lpreg.models.checkpoint.checkpoint_problems` to say."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and checkpoint_step(p) is not None and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def read_latest_pointer(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint name in ``checkpoints/latest``; None when the file is missing or empty (a pointer is
    written whole through a rename, so an empty one was truncated by something else)."""
    pointer = checkpoints_root(run_dir) / LATEST_POINTER
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def write_latest_pointer(run_dir: str | os.PathLike, name: str) -> None:
    """Point ``checkpoints/latest`` at ``name``: written to a temp file, flushed to disk, then renamed, so a
    reader (or a rerun after a kill) sees the old pointer or the new one, never a torn one.

    Raises:
        OSError: the write failed (e.g. ENOSPC); the old pointer is untouched.
    """
    root = checkpoints_root(run_dir)
    tmp = root / f"{LATEST_POINTER}.tmp"
    with open(tmp, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / LATEST_POINTER)


def rewrite_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Keep only the rows of a JSON-lines file for which ``keep`` is true (atomically: temp file + rename); a torn
    line (a run killed mid-write) goes too. Returns the number of rows and torn lines dropped (0: file unchanged).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint the ``latest`` pointer names; without a pointer (missing or empty), the newest checkpoint
    directory that has a manifest (a complete save).

    Raises:
        FileNotFoundError: the run has no complete checkpoint, or the pointer names a missing directory.
    """
    root = checkpoints_root(run_dir)
    name = read_latest_pointer(run_dir)
    if name is not None:
        path = root / name
        if not path.is_dir():
            raise FileNotFoundError(f"{root / LATEST_POINTER} names {name}, which does not exist")
        return path
    found = [p for p in list_checkpoints(run_dir) if (p / MANIFEST_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root} is complete (did training finish and save?)")
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
