"""One Hugging Face export per training checkpoint, cached inside it and shared by every eval of that checkpoint.

An eval-array task per (checkpoint x benchmark) used to export its checkpoint into its own output directory: five
65 GB copies of one 32B checkpoint for five benchmarks. Now the export lives in ``<step dir>/hf_export/``:

- written once: the first task takes an exclusive ``flock`` on ``<step dir>/.hf_export.lock``, exports (the export
  itself is atomic, a hidden temp dir renamed into place by ``models.convert.convert_mcore_to_hf``), and every
  other task waits on the lock, then finds the directory complete and reuses it;
- removed with the checkpoint: it is inside the step directory, so checkpoint retention (``checkpoint.keep_last``,
  ``checkpoint.keep_every``) and a re-save of the same step delete it with the checkpoint, never leaving an export
  of weights that no longer exist;
- a killed export leaves only a hidden ``.hf_export.tmp-*`` dir, removed by the next exporter under the lock.

A checkpoint directory the evaluating user cannot write falls back to an export under the task's own output
directory (the old behaviour, with a warning). A file system without ``flock`` support (e.g. Lustre mounted with
``noflock``) runs without the lock: concurrent tasks may then export twice, each atomically, and the last rename wins.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

HF_EXPORT_DIR = "hf_export"
"""The cached HF export inside a checkpoint's step directory."""
LOCK_FILE = ".hf_export.lock"
"""Lock file next to it (same directory), held while one task exports."""

Exporter = Callable[[Path, Path, "str | None"], Path]
"""``(checkpoint, out_dir, hf_config_dir) -> out_dir``: writes an HF directory at ``out_dir`` atomically."""


def is_hf_dir(path: Path) -> bool:
    """A complete HF directory: written by a rename, so its config.json exists only once everything does."""
    return (path / "config.json").is_file()


def default_exporter(checkpoint: Path, out_dir: Path, hf_config_dir: str | None) -> Path:
    """The real export (:func:`megatron_lpreg.models.convert.convert_mcore_to_hf`, atomic: temp dir + rename)."""
    from megatron_lpreg.models.convert import convert_mcore_to_hf

    return convert_mcore_to_hf(checkpoint, out_dir, hf_config_dir=hf_config_dir, overwrite=True)


def cached_hf_export(checkpoint: Path, hf_config_dir: str | None = None, *, fallback_dir: Path | None = None,
                     exporter: Exporter | None = None) -> tuple[Path, bool]:
    """The HF directory of training checkpoint ``checkpoint``, exported once into ``<checkpoint>/hf_export``.

    Args:
        checkpoint: a training checkpoint's step directory (``<run>/checkpoints/step_N``).
        hf_config_dir: config.json and tokenizer source (``model.hf_path``; None = the checkpoint's own assets).
        fallback_dir: where to export when ``checkpoint`` is not writable (``<fallback_dir>/hf_model``).
        exporter: the export function (default :func:`default_exporter`).

    Returns:
        ``(hf_dir, exported)``: ``exported`` is True when this call wrote it, False when it was reused.

    Raises:
        PermissionError: ``checkpoint`` is not writable and no ``fallback_dir`` was given.
    """
    export = exporter or default_exporter
    target = checkpoint / HF_EXPORT_DIR
    if is_hf_dir(target):
        logger.info("reusing the HF export %s", target)
        return target, False
    if not os.access(checkpoint, os.W_OK):
        if fallback_dir is None:
            raise PermissionError(f"cannot write the HF export into {checkpoint} (not writable) and no fallback "
                                  "directory was given")
        private = fallback_dir / "hf_model"
        logger.warning("%s is not writable: exporting to %s for this evaluation only (not shared)", checkpoint,
                       private)
        return export(checkpoint, private, hf_config_dir), True
    with _exclusive(checkpoint / LOCK_FILE):
        if is_hf_dir(target):  # another task exported it while this one waited for the lock
            logger.info("reusing the HF export %s (written by another task)", target)
            return target, False
        for pattern in (f".{HF_EXPORT_DIR}.tmp-*", f".{HF_EXPORT_DIR}.old-*"):  # a killed export's (nobody else
            for leftover in checkpoint.glob(pattern):                          # writes while we hold the lock)
                shutil.rmtree(leftover, ignore_errors=True)
        logger.info("exporting %s to %s (once; later evaluations reuse it)", checkpoint, target)
        export(checkpoint, target, hf_config_dir)
    return target, True


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocking); without flock support, go on unlocked with a warning."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another task's HF export of %s", path.parent)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK/ENOSYS: a file system without flock
            logger.warning("no lock on %s (%s): concurrent evaluations may export twice (each atomically)", path, exc)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
