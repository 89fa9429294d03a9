"""A checkpoint's manifest: what was written (format, model config, layout, every file's size and sha256), and
the checks and messages built on it. Not collective; :mod:`megatron_lpreg.models.checkpoint` splits the
checksum work over ranks.

Every refusal names the file and the cause: a missing manifest (an interrupted write), a missing or truncated
file, a checksum mismatch, an unreadable per-rank file, or the OS error of a failed write (``ENOSPC``).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.models.hf_dir import copy_assets

FORMAT = "megatron_lpreg.dist_ckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIST_DIR = "dist"
HF_ASSETS_DIR = "hf_assets"

ARCH_FIELDS = ("arch", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
               "num_query_groups", "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps")
"""ModelConfig fields that must match between a checkpoint and the model it is loaded into (shapes and math).
Padding (make_vocab_size_divisible_by), dtype, paths and the layer implementation may differ."""
_HASH_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model it is loaded into."""


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint ``path``.

    Raises:
        CheckpointError: no checkpoint there, not one of ours, or a newer/older format version.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} is not a megatron_lpreg checkpoint: {MANIFEST} is missing (an interrupted "
                              f"write leaves only a hidden .tmp dir; convert or save again)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
                              f" is not {FORMAT!r} version {FORMAT_VERSION}")
    return manifest


def config_diff(saved: dict[str, Any], model_cfg: Any) -> list[str]:
    """``field: checkpoint=<x> model=<y>`` for every architecture field that differs (empty when compatible)."""
    current = dataclasses.asdict(model_cfg)
    return [f"model.{key}: checkpoint={saved.get(key)!r} model={current[key]!r}"
            for key in ARCH_FIELDS if saved.get(key) != current[key]]


def file_problem(path: Path, rel: str, meta: dict[str, Any], *, checksum: bool) -> str | None:
    """What is wrong with one manifest file (missing, truncated, wrong size, corrupt), else None."""
    file = path / rel
    if not file.is_file():
        return f"{rel}: missing"
    size = file.stat().st_size
    if size < meta["bytes"]:
        return f"{rel}: truncated ({size} bytes, the manifest says {meta['bytes']})"
    if size != meta["bytes"]:
        return f"{rel}: {size} bytes, the manifest says {meta['bytes']}"
    if checksum and _sha256(file) != meta["sha256"]:
        return f"{rel}: sha256 mismatch (corrupt)"
    return None


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """Why ``path`` is not a complete checkpoint (empty list: it is), from its manifest and file sizes only.

    Cheap and not collective: no checksums (:func:`load_checkpoint` verifies those, split over ranks). Each entry
    names the file and the cause (no manifest, unreadable manifest, missing or truncated file).
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = [file_problem(path, rel, meta, checksum=False) for rel, meta in sorted(manifest["files"].items())]
    return [f"{path}/{p}" for p in problems if p is not None]


def load_rank_file(path: str | os.PathLike, name: str) -> Any | None:
    """A per-rank file saved with ``save_checkpoint(rank_files=...)``; None when the checkpoint has none (older
    checkpoints, or a rank that did not exist at save time). Loaded with ``weights_only=True``: tensors and
    plain Python containers only, never arbitrary pickled code.

    Raises:
        CheckpointError: the file cannot be read (truncated, corrupt, or holding other objects); names the file.
    """
    file = Path(path) / name
    if not file.is_file():
        return None
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # zip reader errors, EOFError, UnpicklingError of a disallowed global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file} cannot be read: {type(exc).__name__}: {first} (truncated or corrupt; "
                              f"{file.stat().st_size} bytes)") from exc


def _os_error_in(exc: BaseException, seen: set[int] | None = None) -> OSError | None:
    """The OSError behind a failed save: ``exc`` itself, its cause/context chain, or one of the per-rank failures
    torch.distributed.checkpoint gathers into a ``CheckpointException``."""
    seen = set() if seen is None else seen
    if id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    nested: list[BaseException] = []
    for failure in (getattr(exc, "failures", None) or {}).values():
        nested.append(failure[0] if isinstance(failure, tuple) else failure)
    nested += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    for inner in nested:
        if isinstance(inner, BaseException) and (found := _os_error_in(inner, seen)) is not None:
            return found
    return None


FULL_DISK_BYTES = 1 << 20
"""A write that failed without an errno (torch's zip writer reports a short write as ``unexpected pos``) is
put down to a full disk when less than this is left on the target's filesystem."""


def _root_cause(exc: BaseException) -> str:
    """First line of the innermost cause (of the first per-rank failure of a ``CheckpointException``)."""
    failures = list((getattr(exc, "failures", None) or {}).values())
    if failures:
        exc = failures[0][0] if isinstance(failures[0], tuple) else failures[0]
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            stats = os.statvfs(candidate)
            return stats.f_bavail * stats.f_frsize
    return None


def write_failure(exc: BaseException, path: Path, *, where: Path | None = None,
                  consequence: str = "nothing was renamed into place and earlier checkpoints are untouched"
                  ) -> CheckpointError | None:
    """A CheckpointError naming ``path``, the OS cause (``No space left on device [ENOSPC]``) and
    ``consequence`` when an OSError lies behind ``exc`` (or it carries no errno but the filesystem of ``where``
    is full), else None (the caller re-raises ``exc`` unchanged). Call it before the partial output is removed.
    """
    target = where or path
    oserror = _os_error_in(exc)
    if oserror is not None:
        code = errno.errorcode.get(oserror.errno, str(oserror.errno))
        return CheckpointError(f"saving checkpoint {path} failed: {os.strerror(oserror.errno)} [{code}] writing "
                               f"{oserror.filename or target}; {consequence}")
    free = _free_bytes(target)
    if free is None or free >= FULL_DISK_BYTES:
        return None
    return CheckpointError(f"saving checkpoint {path} failed: {os.strerror(errno.ENOSPC)} [ENOSPC] writing "
                           f"{target} ({free} bytes left on its filesystem; the write error was: {_root_cause(exc)}); "
                           f"{consequence}")


def write_manifest(tmp: Path, model_cfg: Any, ctx: Any, *, vpp: int, has_optimizer: bool,
                    hf_assets_dir: str | os.PathLike | None) -> None:
    """Rank 0, last step of a save: copy the HF assets, then checksum every file into the manifest."""
    if hf_assets_dir is not None:
        assets = tmp / HF_ASSETS_DIR
        assets.mkdir()
        copy_assets(hf_assets_dir, assets)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_unix": time.time(),
        "model": dataclasses.asdict(model_cfg), "parallel": {"tp": ctx.tp_size, "pp": ctx.pp_size, "vpp": vpp},
        "has_optimizer": has_optimizer, "files": _file_table(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
