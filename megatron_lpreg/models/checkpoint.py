"""Atomic megatron dist checkpoints (torch_dist) with a manifest, load-time checks and resharding.

Layout of a checkpoint directory::

    manifest.json   format + version, model config, tp/pp/vpp it was written at, has_optimizer, and
                    {relative path: {bytes, sha256}} for every file below
    dist/           megatron ``dist_checkpointing`` (torch_dist): model chunks ("model" / "model0".. for virtual
                    pipeline), optionally "optimizer", and "extra" (plain picklable data, rank 0's copy);
                    written by the converter, its data files sit in ``part<i>/`` subdirectories (one per layer)
    hf_assets/      optional: the HF config.json, generation config and tokenizer files, for export back to HF
    <rank files>    optional: per-rank files the caller passes (the trainer's ``rng_rank<r>.pt``)

Writes go to a hidden temp dir next to the target, then one rename, so a reader never sees a partial
checkpoint. Loading checks the manifest (format version, architecture fields, file sizes and checksums, split over
ranks) before touching a parameter, and refuses with a diff or a list of bad files. Megatron's sharded state dict
makes the checkpoint layout-free: it loads at any TP/PP/VPP (padded vocab rows included, via megatron's
``allow_shape_mismatch`` on embedding/output). Distributed-optimizer state is saved in one of
:data:`OPTIMIZER_FORMATS` (``fully_reshardable`` by default; ``dp_reshardable`` gathers nothing).

The manifest and the integrity checks built on it live in :mod:`megatron_lpreg.models.manifest`; the HF <->
megatron conversion jobs in :mod:`megatron_lpreg.models.convert`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import queue
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.models.bridge import unwrap
from megatron_lpreg.models.manifest import (  # noqa: F401 (the checkpoint API, re-exported)
    ARCH_FIELDS,
    DIST_DIR,
    FORMAT,
    FORMAT_VERSION,
    HF_ASSETS_DIR,
    MANIFEST,
    CheckpointError,
    checkpoint_problems,
    config_diff,
    file_problem,
    load_rank_file,
    read_manifest,
    write_failure,
    write_manifest,
)
from megatron_lpreg.parallel import collectives

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Atomic output directories (used for dist checkpoints and HF exports).


def _broadcast_str(value: str) -> str:
    return collectives.broadcast_object(value, src=0) if collectives.world_size() > 1 else value


def _barrier() -> None:
    if collectives.world_size() > 1:
        collectives.barrier()


def _rank() -> int:
    return collectives.rank()


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir (same on every rank, next to ``path``); on success rank 0 renames it to ``path``.

    Collective when torch.distributed is initialized: every rank enters and leaves together. On an exception the
    temp dir is removed (by each rank that fails) and ``path`` is untouched.

    Raises:
        CheckpointError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"output {path} already exists; remove it or write elsewhere (in Python: "
                              f"overwrite=True replaces it atomically)")
    tmp = Path(_broadcast_str(str(path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")))
    if _rank() == 0:
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            if path.exists():
                trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, trash)
                os.replace(tmp, path)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, path)
        _barrier()
    except BaseException:
        # every failing rank removes it: the launcher stops the other ranks as soon as one reports its failure, so
        # rank 0 may never reach this line (a full disk failed on rank 1 first and left the temp dir, 1 run in 2)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Verification (collective).


def _verify_files(path: Path, manifest: dict[str, Any], *, checksums: bool) -> None:
    """Check every manifest file (size, optionally sha256); the work is split over ranks, errors gathered."""
    rank, world = _rank(), collectives.world_size()
    errors = [problem for i, (rel, meta) in enumerate(sorted(manifest["files"].items())) if i % world == rank
              and (problem := file_problem(path, rel, meta, checksum=checksums)) is not None]
    if world > 1:
        errors = [e for rank_errors in collectives.all_gather_object(errors) for e in rank_errors]
    if errors:
        raise CheckpointError(f"checkpoint {path} is damaged ({len(errors)} file(s)): " + "; ".join(sorted(errors)))


# ---------------------------------------------------------------------------------------------------------------
# Save / load.


OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
"""megatron's distributed-optimizer checkpoint formats offered (``checkpoint.optimizer_format``; megatron-core
0.16.1 ``DistributedOptimizer.sharded_state_dict``, optimizer/distrib_optimizer.py:1175-1294):

* ``fully_reshardable``: every DP rank all-gathers its TP/PP shard's whole fp32 parameter and Adam buffers and
  writes them in model space (one tensor per parameter): loadable at any DP/TP/PP layout, but each rank's host
  RAM grows by ~7.5x its fp32 parameters on save and ~3x on load (benchmarks/checkpoint_memory.py).
* ``dp_reshardable``: each rank writes its own flat shard of the buffers as is, with no gather and no copy; it
  reshards across DP only, so loading it at another TP/PP/VPP is refused (the weights still load anywhere).

A non-distributed optimizer is saved the same way under either name.
"""


def _sharded_state(model_chunks: Sequence[torch.nn.Module], optimizer: Any, *, is_loading: bool,
                   optimizer_format: str = "fully_reshardable") -> dict[str, Any]:
    models = [unwrap(c) for c in model_chunks]
    if len(models) == 1:
        state: dict[str, Any] = {"model": models[0].sharded_state_dict()}
    else:
        state = {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}
    if optimizer is not None:
        metadata = {"distrib_optim_sharding_type": optimizer_format}
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _saved_optimizer_format(path: Path) -> str:
    """The distributed-optimizer format a checkpoint was written in (megatron's own record in the common state;
    ``fully_reshardable`` when it holds a non-distributed optimizer's state)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path / DIST_DIR))
    found = {value for key, value in _flat_items(common.get("optimizer", {}))
             if key.endswith("param_state_sharding_type")}
    return found.pop() if len(found) == 1 else "fully_reshardable"


def _flat_items(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flat_items(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def _check_optimizer_layout(path: Path, manifest: dict[str, Any], ctx: Any, vpp: int) -> str:
    """The saved optimizer format; raises CheckpointError when a ``dp_reshardable`` one is loaded at another
    TP/PP/VPP (its flat buffers only fit the layout they were cut from)."""
    optimizer_format = _saved_optimizer_format(path)
    saved = manifest["parallel"]
    here = {"tp": ctx.tp_size, "pp": ctx.pp_size, "vpp": vpp}
    if optimizer_format == "dp_reshardable" and any(saved[k] != v for k, v in here.items()):
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state in checkpoint.optimizer_format=dp_reshardable, written at "
            f"tp={saved['tp']} pp={saved['pp']} vpp={saved['vpp']}; it reshards across data parallel only, not to "
            f"tp={here['tp']} pp={here['pp']} vpp={here['vpp']}: resume at the saved layout, or load the weights "
            f"alone (optimizer=None, e.g. model.mcore_path) and start a fresh optimizer")
    return optimizer_format


@contextlib.contextmanager
def _in_process_write_queue() -> Iterator[None]:
    """Give megatron's torch_dist writer an in-process results queue for the duration of one save.

    Its default is a module-level queue from a *spawn*-context Manager: a server process that re-imports
    ``__main__`` (fatal for unguarded scripts) and outlives ranks that leave with ``os._exit`` (forked harness).
    Our saves are synchronous, so the write results never cross a process boundary and a ``queue.Queue`` does.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _megatron_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Give an untouched distributed optimizer real states before building its loading state dict.

    Without Apex/TE (CPU), megatron's ``DistributedOptimizer.state_dict()`` reads one ``step`` from the torch
    optimizer's states and asserts there is exactly one, which fails while the states are still empty. Its own
    initialiser (a zero-grad step) creates them; every value it writes is then overwritten by the load.
    """
    for opt in _megatron_optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _step_state_workaround(optimizer: Any) -> Iterator[None]:
    """Work around two upstream bugs in megatron-core 0.16's distributed-optimizer load with torch Adam (no
    Apex/TE): ``load_state_dict`` puts one shared ``step`` tensor into every param state (torch Adam then bumps
    it once per parameter per step), and ``load_parameter_state_from_fully_reshardable`` copies *every* state key
    but its source skips ``step`` (KeyError 'step'). For the duration of the load, ``step`` is lifted out of the
    states around that call and put back as one private copy per state. Instance-scoped; no global patching.
    """
    patched = []
    for opt in _megatron_optimizers(optimizer):
        original = getattr(opt, "load_parameter_state_from_fully_reshardable", None)
        if original is None:
            continue

        def without_step(param_state: Any, _opt: Any = opt, _original: Any = original) -> None:
            steps = {p: st.pop("step") for p, st in _opt.optimizer.state.items() if "step" in st}
            try:
                _original(param_state)
            finally:
                for p, step in steps.items():
                    _opt.optimizer.state[p]["step"] = step.clone()

        opt.load_parameter_state_from_fully_reshardable = without_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt.load_parameter_state_from_fully_reshardable  # back to the class method


def _unshare_step_tensors(optimizer: Any) -> None:
    """Give every param state its own ``step`` tensor (see :func:`_step_state_workaround`)."""
    for opt in _megatron_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def save_checkpoint(path: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], model_cfg: Any, ctx: Any, *,
                    optimizer: Any = None, extra: dict[str, Any] | None = None,
                    rank_files: Mapping[str, Any] | None = None, hf_assets_dir: str | os.PathLike | None = None,
                    overwrite: bool = False, on_progress: Callable[[str], None] | None = None,
                    optimizer_format: str = "fully_reshardable") -> Path:
    """Save model chunks (and optionally optimizer state and ``extra``) as an atomic dist checkpoint.

    Collective: every rank of the job calls it with its own chunks. Order: shards into a hidden temp dir, every
    rank's ``rank_files``, then rank 0's manifest (sizes and checksums of all of them), then one rename; so
    ``path`` appears complete or not at all.

    Args:
        path: checkpoint directory to create.
        model_chunks: this rank's GPTModel chunks (one per virtual pipeline stage), possibly wrapped.
        model_cfg: ``ModelConfig``; recorded in the manifest and checked on load.
        ctx: ``ParallelContext``; its tp/pp/vpp are recorded (informational: the checkpoint reshards on load).
        optimizer: a megatron ``MegatronOptimizer`` whose state to include.
        extra: plain picklable data (run state, scheduler); rank 0's copy is stored.
        rank_files: this rank's own files, ``{file name: tensors / plain containers}`` (``torch.save``d; read
            back with :func:`load_rank_file`); names must differ between ranks.
        hf_assets_dir: an HF model dir whose config/tokenizer files to keep in ``hf_assets/``.
        overwrite: replace an existing ``path`` (atomically).
        on_progress: called with ``temp_written``, ``rng_written`` (rank files written), ``manifest_written``
            (rank 0) and ``renamed`` as the save passes them (the fault-injection tests kill the process there).
        optimizer_format: one of :data:`OPTIMIZER_FORMATS` (distributed optimizer; ``checkpoint.optimizer_format``).

    Returns:
        ``path`` as a Path.

    Raises:
        CheckpointError: ``path`` exists without ``overwrite``, or a write failed (the message names the OS
            cause, e.g. ``No space left on device [ENOSPC]``, and the path); the temp dir is removed.
    """
    path = Path(path)
    progress = on_progress or (lambda point: None)
    start = time.monotonic()
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        try:
            _write_into(tmp, model_chunks, model_cfg, ctx, optimizer=optimizer, extra=extra, rank_files=rank_files,
                        hf_assets_dir=hf_assets_dir, progress=progress, optimizer_format=optimizer_format)
        except CheckpointError:
            raise
        except BaseException as exc:  # torch's CheckpointException derives from BaseException
            failure = _save_failure(exc, path, tmp)  # while the temp dir still fills the disk
            if failure is exc:
                raise
            raise failure from exc
    progress("renamed")
    logger.info("saved checkpoint %s in %.1f s", path, time.monotonic() - start)
    return path


def _write_into(tmp: Path, model_chunks: Sequence[torch.nn.Module], model_cfg: Any, ctx: Any, *, optimizer: Any,
                extra: dict[str, Any] | None, rank_files: Mapping[str, Any] | None,
                hf_assets_dir: str | os.PathLike | None, progress: Callable[[str], None],
                optimizer_format: str) -> None:
    from megatron.core import dist_checkpointing

    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format={optimizer_format!r} must be one of {OPTIMIZER_FORMATS}")
    state = _sharded_state(model_chunks, optimizer, is_loading=False, optimizer_format=optimizer_format)
    state["extra"] = extra or {}
    if _rank() == 0:
        (tmp / DIST_DIR).mkdir()
    _barrier()
    with _in_process_write_queue():
        dist_checkpointing.save(state, str(tmp / DIST_DIR), sharded_strategy=("torch_dist", 1))
    _barrier()
    progress("temp_written")
    for name, value in (rank_files or {}).items():
        torch.save(value, tmp / name)
    _barrier()
    progress("rng_written")
    if _rank() == 0:
        write_manifest(tmp, model_cfg, ctx, vpp=len(model_chunks), has_optimizer=optimizer is not None,
                       hf_assets_dir=hf_assets_dir)
        progress("manifest_written")


def _save_failure(exc: BaseException, path: Path, tmp: Path) -> BaseException:
    """The error to raise for a failed save: a CheckpointError naming the OS cause when there is one, else ``exc``.

    torch.distributed.checkpoint raises its CheckpointException on every rank together but hands the per-rank
    causes to the coordinator only; rank 0's description is broadcast so that every rank (whichever the launcher
    hears from first) reports the cause, not ``CheckpointException ranks:dict_keys([])``.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    failure = write_failure(exc, path, where=tmp)
    if isinstance(exc, CheckpointException) and collectives.world_size() > 1:
        text = collectives.broadcast_object(str(failure) if failure is not None else None, src=0)
        failure = CheckpointError(text) if text else None
    return failure if failure is not None else exc


@contextlib.contextmanager
def _allow_partial_fill() -> Iterator[None]:
    """During part saves, drop DCP's "chunks fill the tensor" check and keep its other plan checks.

    A part holds one layer of megatron's layer-stacked tensors by design, so torch's save planner would reject
    its global plan; :func:`_merge_parts` checks the fill of the merged metadata instead.
    """
    from torch.distributed.checkpoint import default_planner

    original = default_planner._validate_global_plan

    def without_fill_check(global_plan: Any, metadata: Any) -> list[str]:
        return [error for error in original(global_plan, metadata) if "invalid fill" not in error]

    planner_logger = logging.getLogger(default_planner.__name__)
    level = planner_logger.level
    default_planner._validate_global_plan = without_fill_check
    planner_logger.setLevel(logging.ERROR)  # it also warns once per unfilled tensor before returning the list
    try:
        yield
    finally:
        default_planner._validate_global_plan = original
        planner_logger.setLevel(level)


def save_checkpoint_from_parts(path: str | os.PathLike, meta_chunks: Sequence[torch.nn.Module],
                               parts: Iterator[tuple[int | None, dict[str, torch.Tensor]]], model_cfg: Any, ctx: Any,
                               *, hf_assets_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a model checkpoint one stage-local layer at a time, without the model ever being in memory.

    Each part (see ``bridge.read_hf_shards_by_layer``) is saved as its own torch_dist checkpoint in a
    ``dist/part<i>/`` directory (collectively, all ranks together); rank 0 then merges their DCP metadata into
    ``dist/.metadata`` (chunks of the same global tensor are concatenated, file paths point into the part
    directories). The result is an ordinary dist checkpoint: :func:`load_checkpoint` loads it at any layout.

    Args:
        meta_chunks: ``[GPTModel]`` on the meta device (its sharded state dict gives keys, shapes and offsets).
        parts: this rank's ``(local_layer, {local parameter name: tensor})``, the same part sequence on all ranks.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    path = Path(path)
    start = time.monotonic()
    layout = unwrap(meta_chunks[0]).sharded_state_dict()
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        part_dirs = []
        for index, (local_layer, tensors) in enumerate(parts):
            state: dict[str, Any] = {name: dataclasses.replace(layout[name], data=t) for name, t in tensors.items()}
            prefix = None if local_layer is None else f"decoder.layers.{local_layer}."
            state.update({k: v for k, v in layout.items() if isinstance(v, ShardedObject)
                          and (k.startswith(prefix) if prefix else not k.startswith("decoder.layers."))})
            if local_layer is None:
                state["extra"] = {}
            part_dir = tmp / DIST_DIR / f"part{index:04d}"
            if _rank() == 0:
                part_dir.mkdir(parents=True)
            _barrier()
            with _in_process_write_queue(), _allow_partial_fill():
                dist_checkpointing.save(state, str(part_dir), sharded_strategy=("torch_dist", 1),
                                        validate_access_integrity=False)
            part_dirs.append(part_dir)
            del state, tensors
        _barrier()
        if _rank() == 0:
            _merge_parts(tmp / DIST_DIR, part_dirs)
            write_manifest(tmp, model_cfg, ctx, vpp=1, has_optimizer=False, hf_assets_dir=hf_assets_dir)
    logger.info("saved checkpoint %s (%d parts) in %.1f s", path, len(part_dirs), time.monotonic() - start)
    return path


def _merge_parts(dist_dir: Path, part_dirs: list[Path]) -> None:
    """One DCP ``.metadata`` for several torch_dist saves of disjoint pieces of the same state dict."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    tensors: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    storage_meta = None
    for part_dir in part_dirs:
        metadata = FileSystemReader(str(part_dir)).read_metadata()
        storage_meta = storage_meta or metadata.storage_meta
        for key, meta in metadata.state_dict_metadata.items():
            if key not in tensors:
                tensors[key] = meta
            elif isinstance(meta, TensorStorageMetadata) and meta.size == tensors[key].size:
                tensors[key].chunks.extend(meta.chunks)
            else:
                raise CheckpointError(f"parts of {dist_dir} disagree on {key}: {meta} vs {tensors[key]}")
        for index, info in metadata.storage_data.items():
            storage[index] = dataclasses.replace(info, relative_path=f"{part_dir.name}/{info.relative_path}")
    unfilled = [key for key, meta in tensors.items() if isinstance(meta, TensorStorageMetadata)
                and sum(math.prod(c.sizes) for c in meta.chunks) != math.prod(meta.size)]
    if unfilled:
        raise CheckpointError(f"merged parts of {dist_dir} do not cover these tensors exactly: {unfilled[:10]}")
    with open(dist_dir / ".metadata", "wb") as handle:
        pickle.dump(Metadata(state_dict_metadata=tensors, storage_data=storage, storage_meta=storage_meta), handle)
    for name in ("metadata.json", "common.pt"):  # identical in every part; the first (non-layer) part has extra
        shutil.copy2(part_dirs[0] / name, dist_dir / name)
    for part_dir in part_dirs:
        for name in (".metadata", "metadata.json", "common.pt"):
            (part_dir / name).unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], model_cfg: Any, ctx: Any, *,
                    optimizer: Any = None, verify_checksums: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into chunks built at any TP/PP/VPP.

    Collective. Checks run before any parameter changes: manifest format, architecture fields (refuses with a
    diff), every file's size and (``verify_checksums``) sha256.

    Args:
        optimizer: load optimizer state too (the checkpoint must have it); its states are initialised first,
            as megatron's sharded optimizer loading requires.

    Returns:
        The ``extra`` dict that was saved.

    Raises:
        CheckpointError: missing/corrupt checkpoint, architecture mismatch, no optimizer state when one is asked,
            or tensors the model expects but the checkpoint lacks.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(path)
    manifest = read_manifest(path)
    diff = config_diff(manifest["model"], model_cfg)
    if diff:
        raise CheckpointError(f"checkpoint {path} was written for a different model; differences:\n  "
                              + "\n  ".join(diff))
    if optimizer is not None and not manifest["has_optimizer"]:
        raise CheckpointError(f"checkpoint {path} has no optimizer state; load it with optimizer=None "
                              f"(checkpoint.save_optimizer was off when it was written)")
    _verify_files(path, manifest, checksums=verify_checksums)
    optimizer_format = "fully_reshardable"
    if optimizer is not None:
        optimizer_format = _check_optimizer_layout(path, manifest, ctx, len(model_chunks))
        _prepare_optimizer_for_load(optimizer)
    state = _sharded_state(model_chunks, optimizer, is_loading=True, optimizer_format=optimizer_format)
    state["extra"] = {}
    # RAISE_UNEXPECTED: megatron's "unexpected" = requested by the model but absent from the checkpoint, checked
    # before anything is read; tensors stored but not requested (optimizer state when loading weights) are fine.
    try:
        loaded = dist_checkpointing.load(state, str(path / DIST_DIR), strict=StrictHandling.RAISE_UNEXPECTED)
    except CheckpointingException as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from exc
    models = [unwrap(c) for c in model_chunks]
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model"] if len(models) == 1 else loaded[f"model{i}"])
    if optimizer is not None:
        # no_grad: megatron's dp_reshardable load copies into the fp32 main params (views of leaf parameters that
        # require grad, distrib_optimizer.py:940) without one of its own; the other loads are decorated with it
        with _step_state_workaround(optimizer), torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_step_tensors(optimizer)
    logger.info("loaded checkpoint %s (written at tp=%d pp=%d)", path, manifest["parallel"]["tp"],
                manifest["parallel"]["pp"])
    return loaded.get("extra", {})


