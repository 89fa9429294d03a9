"""The run directory: its layout, the ``latest`` checkpoint pointer, and the preemption flag.

The one owner of these names; the trainer (``trainer/state.py``, ``trainer/signals.py``) and the launchers
(``launch/``, ``slurm/common.sh`` through ``python -m megatron_lpreg.launch.job``) import it, never each other::

    <run>/config.yaml          resolved config
    <run>/metrics.jsonl        one JSON object per completed step ({"step": s, ...}, s = 0, 1, ...)
    <run>/eval.jsonl           one JSON object per held-out evaluation ({"step": s, ...}: after s steps)
    <run>/logs/rank<r>.log     each trainer rank's log
    <run>/wandb_id             the W&B run id (made by the first attempt; a requeued attempt resumes that run)
    <run>/.preempt_requested   the preemption flag: a trainer that sees it checkpoints and exits with
                               REQUEUE_EXIT_CODE (written by a signal handler, ``launch.job preempt`` or the batch
                               shell's USR1 trap)
    <run>/checkpoints/step_<7-digit step>/   complete checkpoints (``manifest.json`` inside; models/checkpoint.py):
                               the newest ``checkpoint.keep_last`` plus every ``checkpoint.keep_every``-th step
    <run>/checkpoints/latest   the name of the newest complete checkpoint, replaced atomically after it is written
    <run>/checkpoints/.step_<N>.tmp-<id>/    a save in progress (or killed); never a checkpoint
    <run>/checkpoints/.set_aside/            checkpoints a resume found newer than the newest complete one

No torch and nothing else of the package at import: the Slurm scripts read the flag name and the requeue code
(``python -m megatron_lpreg.launch.job preempt-file`` / ``requeue-code``) at start.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
LOGS_DIR = "logs"
CHECKPOINTS = "checkpoints"
LATEST_POINTER = "latest"
SET_ASIDE = ".set_aside"
MANIFEST_FILE = "manifest.json"
"""Written last into a checkpoint's temp dir (``models.checkpoint.MANIFEST``, kept equal by a test)."""
LATEST_SUFFIX = "@latest"
"""A checkpoint spec ``<run_dir>@latest`` is resolved when the eval task starts, not at submission time, so an
eval array can be submitted with ``--dependency afterok:<train job>`` before the checkpoint exists."""
WANDB_ID_FILE = "wandb_id"
"""The W&B run id of this run directory (:func:`wandb_run_id`)."""
PREEMPT_FILE = ".preempt_requested"
"""The preemption flag file in the run directory (its name is part of the slurm/common.sh contract)."""
REQUEUE_EXIT_CODE = 42
"""Exit status meaning "checkpointed on a preemption request; requeue me" (see slurm/train.sbatch)."""

_STEP = re.compile(r"(\d+)$")


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` completed steps (``step_0000040``)."""
    return f"step_{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step number at the end of a checkpoint directory name (``step_0000040`` -> 40), else None."""
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    """``<run>/checkpoints``."""
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


def kept_for_good(name: str, keep_every: int) -> bool:
    """Whether retention keeps checkpoint ``name`` whatever ``keep_last`` says: its step is a positive multiple of
    ``keep_every`` (``checkpoint.keep_every``; 0 = none is)."""
    step = checkpoint_step(name)
    return keep_every > 0 and step is not None and step > 0 and step % keep_every == 0


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, *, keep: str, keep_every: int = 0) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints, except those :func:`kept_for_good` by ``keep_every``
    and the one named ``keep``; each is renamed to a hidden name first, so a kill mid-delete leaves a leftover for
    the next restore to remove, never a half-deleted ``step_N``. Returns the names deleted."""
    found = list_checkpoints(run_dir)
    deleted = []
    for old in found[: max(0, len(found) - keep_last)]:
        if old.name != keep and not kept_for_good(old.name, keep_every):
            trash = old.parent / f".{old.name}.deleting-{uuid.uuid4().hex[:8]}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(old.name)
    return deleted


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


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The W&B run id of ``run_dir``: read from ``<run>/wandb_id``, or made (16 hex digits) and written there
    atomically on first use, so every attempt of a requeued job logs to the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    try:
        run_id = path.read_text().strip()
    except FileNotFoundError:
        run_id = ""
    if run_id:
        return run_id
    run_id = uuid.uuid4().hex[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def preempt_flag(run_dir: str | os.PathLike) -> Path:
    """``<run>/.preempt_requested``: its existence asks the trainer to checkpoint and exit for requeue."""
    return Path(run_dir) / PREEMPT_FILE


def request_preemption(run_dir: str | os.PathLike) -> None:
    """Ask a running trainer (any launcher) to checkpoint and exit with REQUEUE_EXIT_CODE."""
    path = preempt_flag(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def clear_preemption(run_dir: str | os.PathLike) -> None:
    """Withdraw a preemption request (consumed by the trainer that acted on it, or stale)."""
    preempt_flag(run_dir).unlink(missing_ok=True)


def preemption_requested(run_dir: str | os.PathLike) -> bool:
    """Whether the preemption flag is set."""
    return preempt_flag(run_dir).exists()


def clear_stale_request(run_dir: str | os.PathLike, started_at: float) -> bool:
    """Remove a preemption request older than ``started_at`` (epoch seconds): it was meant for an earlier attempt
    (one that crashed, or finished just as it was asked) and would stop this one after its first step. A request
    made after ``started_at`` (Slurm's warning during start-up) is kept. Returns whether one was removed."""
    path = preempt_flag(run_dir)
    try:
        if path.stat().st_mtime >= started_at:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    logger.warning("removed a stale preemption request from an earlier run in %s", path.parent)
    return True
