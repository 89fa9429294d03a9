"""Apply the mapping tables (``mappings.py``) to a built megatron-core model, both directions, one tensor at a time.

This is the only code that walks a mapping table. It opens no file itself: HF safetensors are read through
``hf_dir.HFSafetensors`` (sliced, lazily) and the exported stream is written by ``hf_dir.write_safetensors``
(:mod:`megatron_lpreg.models.hf_dir` owns every HF-directory file).

* :func:`load_hf_weights` fills this rank's model chunks from an HF safetensors directory. Files are opened
  lazily (``safe_open``) and each rank reads only its own rows/columns of each tensor (``get_slice``), so a rank
  never holds more than its shard plus one HF slice.
* :func:`export_hf_weights` is a generator of ``(hf_name, full_tensor)``: TP shards are all-gathered inside the
  tensor-parallel group, un-fused and un-padded. Who yields what: *every* rank yields the tensors its pipeline
  stage owns, with global layer numbers (first stage: embedding; every stage: its layers, across all its virtual
  chunks; last stage: final norm and, untied, ``lm_head``). TP ranks of one stage yield identical streams and must
  all consume the generator (it runs TP collectives); DP replicas yield duplicates. A consumer that writes or sends
  usually keeps ``tp_rank == 0 and dp_rank == 0`` of each stage. The same stream serves HF export
  (``hf_dir.write_safetensors``), checkpoint conversion and rollout weight sync.
* Every HF name must be consumed exactly once and every megatron parameter must be mapped; anything else is a
  ``ValueError`` listing the names.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_lpreg.models.hf_dir import HFSafetensors, listing
from megatron_lpreg.models.mappings import HeadDims, Mapping, MappingTable, mapping_table, merge_shards, read_shard
from megatron_lpreg.parallel import collectives
from megatron_lpreg.telemetry import progress

logger = logging.getLogger(__name__)

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


@dataclass(frozen=True)
class _Param:
    global_name: str
    local_name: str
    """Name inside its chunk (``decoder.layers.<chunk-local index>...``): the key of its sharded state dict."""
    local_layer: int | None
    param: torch.nn.Parameter
    row: Mapping
    layer: int | None


def _uses_fused_norms(model_chunks: Sequence[torch.nn.Module]) -> bool:
    return any(n.endswith("layer_norm_weight") for c in model_chunks for n, _ in unwrap(c).named_parameters())


def _table(model_cfg: Any, model_chunks: Sequence[torch.nn.Module]) -> MappingTable:
    return mapping_table(model_cfg.arch, tie_word_embeddings=model_cfg.tie_word_embeddings,
                         fused_norms=_uses_fused_norms(model_chunks))


def _plan(model_chunks: Sequence[torch.nn.Module], table: MappingTable) -> list[_Param]:
    """Every parameter of this rank's chunks resolved to a table row with its *global* layer index."""
    plan, unmapped = [], []
    for chunk in model_chunks:
        model = unwrap(chunk)
        for local_name, param in model.named_parameters():
            global_name, local_layer = local_name, None
            match = _LOCAL_LAYER.match(local_name)
            if match:
                local_layer = int(match.group(1))
                # layer_number is megatron's 1-based global index (PP and virtual-PP offsets applied)
                layer_number = model.decoder.layers[int(match.group(1))].layer_number
                global_name = f"decoder.layers.{layer_number - 1}." + local_name[match.end():]
            resolved = table.resolve(global_name)
            if resolved is None:
                unmapped.append(global_name)
                continue
            plan.append(_Param(global_name, local_name, local_layer, param, resolved.row, resolved.layer))
    if unmapped:
        raise ValueError(f"{len(unmapped)} megatron parameters have no row in mapping table '{table.name}': "
                         f"{listing(unmapped)}. Add rows to models/mappings.py or fix the layer spec.")
    return plan


def _heads(model_cfg: Any) -> HeadDims:
    return HeadDims(model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim)


def _check_hf_names(hf: HFSafetensors, table: MappingTable, num_layers: int) -> set[str]:
    expected = table.expected_hf_names(num_layers)
    present = {n for n in hf.names() if not table.is_ignored(n)}
    problems = []
    if expected - present:
        problems.append(f"missing {len(expected - present)} tensor(s): {listing(expected - present)}")
    if present - expected:
        problems.append(f"{len(present - expected)} tensor(s) not used by mapping table '{table.name}': "
                        f"{listing(present - expected)}")
    if problems:
        raise ValueError(f"hf dir {hf.hf_dir} does not match model.arch={table.name.split()[0]} with "
                         f"num_layers={num_layers}: " + "; ".join(problems))
    return expected


def check_hf_checkpoint(hf_dir: str | os.PathLike, model_cfg: Any, *, fused_norms: bool = False) -> None:
    """Header-only check that ``hf_dir`` holds exactly the tensors ``model_cfg``'s mapping table expects.

    Cheap (no tensor data is read); conversion runs it before starting any rank.

    Raises:
        ValueError: missing/truncated/corrupt shards, missing tensors, or tensors the table does not use.
    """
    table = mapping_table(model_cfg.arch, tie_word_embeddings=model_cfg.tie_word_embeddings, fused_norms=fused_norms)
    _check_hf_names(HFSafetensors(hf_dir), table, model_cfg.num_layers)


def _hf_shards(plan: list[_Param], hf: HFSafetensors, model_cfg: Any, ctx: Any,
               consumed: Counter[str]) -> Iterator[tuple[_Param, torch.Tensor]]:
    """``(item, this rank's shard)`` for each plan item, read lazily; counts HF names into ``consumed``."""
    heads, tp_rank, tp_size = _heads(model_cfg), ctx.tp_rank, ctx.tp_size
    for item in progress(plan, total=len(plan), desc="load hf", rank=dist.get_rank()):
        names = item.row.hf_names(item.layer)
        lens = [hf.shape(n)[item.row.tp_dim or 0] for n in names]
        padded = item.param.shape[0] * tp_size if item.row.vocab else None
        shard = read_shard(item.row, item.layer, hf.read, lens, heads, tp_rank, tp_size, padded)
        if shard.shape != item.param.shape:
            raise ValueError(f"{item.global_name}: HF tensors {', '.join(names)} give a shard of shape "
                             f"{tuple(shard.shape)} but the model has {tuple(item.param.shape)} (tp_rank "
                             f"{tp_rank}/{tp_size}); does model config match {hf.hf_dir}/config.json?")
        if not item.row.tied:
            consumed.update(names)
        yield item, shard.to(item.param.dtype)


def _check_coverage(consumed: Counter[str], expected: set[str]) -> None:
    """Collective: every expected HF name was loaded by some rank, and by no rank twice."""
    twice = [n for n, c in consumed.items() if c > 1]
    if twice:
        raise ValueError(f"HF tensors consumed more than once on rank {dist.get_rank()}: {listing(twice)}")
    everywhere: list[set[str]] = collectives.all_gather_object(set(consumed))
    unconsumed = expected - set().union(*everywhere)
    if unconsumed:
        raise ValueError(f"HF tensors no rank loaded (model lacks the parameters the table expects): "
                         f"{listing(unconsumed)}")


def load_hf_weights(model_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike, model_cfg: Any,
                    ctx: Any) -> None:
    """Copy HF safetensors weights into this rank's megatron model chunks (its TP shard, its PP stage).

    Args:
        model_chunks: this rank's GPTModel chunks (one per virtual pipeline stage), possibly DDP-wrapped.
        hf_dir: directory with ``*.safetensors`` (and ``model.safetensors.index.json`` when sharded).
        model_cfg: ``ModelConfig`` the chunks were built from (arch, head counts, vocab, tying).
        ctx: ``ParallelContext`` (uses ``tp_rank``, ``tp_size``); all ranks of the job must call this.

    Raises:
        ValueError: missing/unused HF tensors, unmapped megatron parameters, a shape mismatch, or an unreadable
            shard; raised before any parameter is modified when the problem is visible from the headers.
    """
    table = _table(model_cfg, model_chunks)
    plan = _plan(model_chunks, table)
    consumed: Counter[str] = Counter()
    hf = HFSafetensors(hf_dir)
    expected = _check_hf_names(hf, table, model_cfg.num_layers)
    for item, shard in _hf_shards(plan, hf, model_cfg, ctx, consumed):
        with torch.no_grad():
            item.param.copy_(shard)
    _check_coverage(consumed, expected)
    logger.info("loaded %d HF tensors into %d parameters from %s", len(consumed), len(plan), hf_dir)


def read_hf_shards_by_layer(meta_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike, model_cfg: Any,
                            ctx: Any, *, read: bool = True) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """This rank's HF shards grouped by stage-local layer, for writing a checkpoint without building a model.

    Args:
        meta_chunks: ``[GPTModel]`` on the meta device for this rank's stage (names and shapes only; no VPP).
        read: False yields uninitialised placeholders of the right shapes instead (a data-parallel replica,
            whose copy a checkpoint save does not write, need not read or hold anything).

    Yields:
        ``(local_layer, {local parameter name: shard})``: first ``None`` (embedding, final norm, output layer;
        empty on middle stages), then every stage-local layer index in order, up to the largest stage's count
        (empty where this stage has fewer layers). Every rank yields the same sequence of parts, so the caller's
        collective per part lines up; the cross-rank coverage check runs (collectively) when the generator is
        resumed after the last part.

    Raises:
        ValueError: as :func:`load_hf_weights`.
    """
    if len(meta_chunks) != 1:
        raise ValueError("read_hf_shards_by_layer: virtual pipeline chunks are not supported here")
    table = _table(model_cfg, meta_chunks)
    plan = _plan(meta_chunks, table)
    consumed: Counter[str] = Counter()
    hf = HFSafetensors(hf_dir)
    expected = _check_hf_names(hf, table, model_cfg.num_layers)
    # uneven pipeline stages hold different layer counts: every rank walks the largest stage's parts (an
    # empty part where it has no such layer) so the caller's collective per part still lines up
    parts = max(collectives.all_gather_object(len(unwrap(meta_chunks[0]).decoder.layers)))
    for part in [None, *range(parts)]:
        items = [item for item in plan if item.local_layer == part]
        if not read:
            yield part, {i.local_name: torch.empty(i.param.shape, dtype=i.param.dtype) for i in items}
            continue
        yield part, {item.local_name: shard for item, shard in _hf_shards(items, hf, model_cfg, ctx, consumed)}
    _check_coverage(consumed, expected)


def export_hf_weights(model_chunks: Sequence[torch.nn.Module], model_cfg: Any, ctx: Any, *,
                      dtype: torch.dtype | None = None,
                      all_tp_ranks: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every HF tensor this rank's pipeline stage owns (see module doc).

    Args:
        model_chunks: this rank's chunks, possibly DDP-wrapped.
        model_cfg: ``ModelConfig`` (vocab_size trims the padded vocab rows).
        ctx: ``ParallelContext`` (``tp_rank``, ``tp_size``, ``tp_group``). All TP ranks of a stage must drain the
            generator in step: each TP-split tensor costs one collective in the TP group.
        dtype: cast each yielded tensor (default: the parameter dtype).
        all_tp_ranks: True: every TP rank yields the full tensors (all-gather). False: only TP rank 0 yields
            (gather to it); the other TP ranks still drain the generator but yield nothing and never hold more
            than their own shard (what a single writer per stage wants).

    Yields:
        HF name and its full (un-sharded, un-padded, un-fused) tensor, one at a time; each holds fresh memory.
    """
    table = _table(model_cfg, model_chunks)
    heads, tp_size = _heads(model_cfg), ctx.tp_size
    receiver = all_tp_ranks or ctx.tp_rank == 0
    for item in _plan(model_chunks, table):
        if item.row.tied:  # the first stage exports the embedding; this is its copy on the last stage
            continue
        local = item.param.detach()
        if item.row.tp_dim is None or tp_size == 1:
            shards = [local]
        else:
            local = local.contiguous()
            if all_tp_ranks:
                shards = collectives.all_gather(local, group=ctx.tp_group)
            else:
                shards = collectives.gather(local, dst=collectives.global_rank(ctx.tp_group, 0), group=ctx.tp_group)
        if not receiver:
            continue
        merged = merge_shards(item.row, item.layer, shards, heads, vocab_size=model_cfg.vocab_size)
        del shards  # the gathered shards are dead once merged: peak = one full tensor plus its shards
        while merged:
            name, tensor = merged.pop(0)
            if dtype is not None:
                tensor = tensor.to(dtype)
            if tensor.untyped_storage().data_ptr() == item.param.untyped_storage().data_ptr():
                tensor = tensor.clone()  # never hand out a view of a live parameter
            yield name, tensor
            del tensor


def export_hf_weights_from_checkpoint(dist_dir: str | os.PathLike, meta_chunks: Sequence[torch.nn.Module],
                                      model_cfg: Any, ctx: Any, *,
                                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF tensors straight out of a megatron dist checkpoint, one tensor in memory at a time.

    No model is materialised: ``meta_chunks`` is the model built on the meta device at TP1/PP1, used only for
    its parameter names and its sharded-state-dict layout; each request asks megatron's loader for one full
    (un-sharded) tensor, whatever layout the checkpoint was written at. The job's ranks split the tensors
    round-robin and each yields its share.

    Args:
        dist_dir: the ``dist/`` directory of a checkpoint (torch_dist).
        meta_chunks: ``[GPTModel]`` on the meta device, built for TP1/PP1 with every stage's modules.
        model_cfg: ``ModelConfig`` of the checkpoint.
        ctx: ``ParallelContext`` of a TP1/PP1 job with at least 2 ranks (megatron's torch_dist loader places
            "other ranks'" shard metadata on rank (r+1) % world, which collides with rank r in a 1-rank job).
        dtype: cast each yielded tensor.

    Raises:
        ValueError: a layout other than TP1/PP1, a 1-rank job, or unmapped parameters.
    """
    from megatron.core import dist_checkpointing

    world = dist.get_world_size()
    if ctx.tp_size != 1 or ctx.pp_size != 1 or world < 2:
        raise ValueError(f"streaming export needs a TP1/PP1 job of >= 2 ranks (got tp={ctx.tp_size} "
                         f"pp={ctx.pp_size} world={world})")
    plan = [p for p in _plan(meta_chunks, _table(model_cfg, meta_chunks)) if not p.row.tied]
    sharded = unwrap(meta_chunks[0]).sharded_state_dict()
    mine = plan[dist.get_rank()::world]
    heads = _heads(model_cfg)
    for i in range(-(-len(plan) // world)):  # every load is collective: the shorter share sends empty requests
        request = {}
        if i < len(mine):
            entry = sharded[mine[i].global_name]
            request[mine[i].global_name] = dataclasses.replace(
                entry, data=torch.empty(entry.data.shape, dtype=entry.data.dtype))
        # Partial requests (one layer of a layer-stacked tensor) do not cover whole tensors by design.
        loaded = dist_checkpointing.load(request, str(dist_dir), validate_access_integrity=False)
        if not request:
            continue
        item = mine[i]
        merged = merge_shards(item.row, item.layer, [loaded.pop(item.global_name)], heads,
                              vocab_size=model_cfg.vocab_size)
        del loaded, request
        while merged:
            name, tensor = merged.pop(0)
            yield name, tensor if dtype is None else tensor.to(dtype)
            del tensor
