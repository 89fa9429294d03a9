"""Apply the mapping tables (``mappings.py``) to a built megatron-core model, both directions, one tensor at a time.

This is the only code that walks a mapping table.

* :func:`load_hf_weights` fills this rank's model chunks from an HF safetensors directory. Files are opened
  lazily (``safe_open``) and each rank reads only its own rows/columns of each tensor (``get_slice``), so a rank
  never holds more than its shard plus one HF slice.
* :func:`export_hf_weights` is a generator of ``(hf_name, full_tensor)``: TP shards are all-gathered inside the
  tensor-parallel group, un-fused and un-padded. Who yields what: *every* rank yields the tensors its pipeline
  stage owns, with global layer numbers (first stage: embedding; every stage: its layers, across all its virtual
  chunks; last stage: final norm and, untied, ``lm_head``). TP ranks of one stage yield identical streams and must
  all consume the generator (it runs TP collectives); DP replicas yield duplicates. A consumer that writes or sends
  usually keeps ``tp_rank == 0 and dp_rank == 0`` of each stage. The same stream serves HF export
  (:func:`write_hf_safetensors`), checkpoint conversion and rollout weight sync.
* Every HF name must be consumed exactly once and every megatron parameter must be mapped; anything else is a
  ``ValueError`` listing the names.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from megatron_lpreg.models.mappings import HeadDims, Mapping, MappingTable, mapping_table, merge_shards, read_shard
from megatron_lpreg.parallel import collectives
from megatron_lpreg.telemetry import progress

logger = logging.getLogger(__name__)

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_MAX_LISTED = 20
INDEX_FILE = "model.safetensors.index.json"


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


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
                local_layer = int(match.group(1))  # layer_number is megatron's 1-based global index (PP and virtual-PP offsets applied)
                layer_number = model.decoder.layers[int(match.group(1))].layer_number
                global_name = f"decoder.layers.{layer_number - 1}." + local_name[match.end():]
            resolved = table.resolve(global_name)
            if resolved is None:
                unmapped.append(global_name)
                continue
            plan.append(_Param(global_name, local_name, local_layer, param, resolved.row, resolved.layer))
    if unmapped:
        raise ValueError(f"{len(unmapped)} megatron parameters have no row in mapping table '{table.name}': "
                         f"{_listing(unmapped)}. Add rows to models/mappings.py or fix the layer spec.")
    return plan


def _heads(model_cfg: Any) -> HeadDims:
    return HeadDims(model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim)


class HFSafetensors:
    """Lazy, read-only view of an HF checkpoint directory's safetensors (single file or sharded with an index).

    Every file's header is checked on construction, so a missing, truncated or corrupt shard fails before any
    weight is read. Each :meth:`read` maps the file only for the duration of that read: pages of a file that
    stayed mapped would count in this process' resident set until the end of the load.

    Raises:
        ValueError: no safetensors in ``hf_dir``, an index naming a missing file, or an unreadable file.
    """

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise ValueError(f"hf dir {self.hf_dir} has no *.safetensors files (and no {INDEX_FILE})")
        missing = [f for f in files if not (self.hf_dir / f).is_file()]
        if missing:
            raise ValueError(f"hf dir {self.hf_dir}: shard file(s) listed in {INDEX_FILE} are missing: "
                             f"{_listing(missing)}")
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for name in files:
            try:
                with safe_open(str(self.hf_dir / name), framework="pt") as handle:
                    keys = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except Exception as exc:  # safetensors raises its own error types for bad headers / short files
                raise ValueError(f"hf dir {self.hf_dir}: shard {name} is truncated or corrupt ({exc})") from exc
            for key, shape in keys.items():
                if key in self._file_of:
                    raise ValueError(f"hf dir {self.hf_dir}: tensor {key} is stored twice "
                                     f"({self._file_of[key]} and {name})")
                self._file_of[key], self._shapes[key] = name, shape
        stale = {k for k, f in weight_map.items() if self._file_of.get(k) != f}
        if stale:
            raise ValueError(f"hf dir {self.hf_dir}: {INDEX_FILE} names tensors not found in the listed shard: "
                             f"{_listing(stale)}")

    def __enter__(self) -> HFSafetensors:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> list[int]:
        return list(self._shapes[name])

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim=0``) or columns (``dim=1``) ``[start, stop)`` of tensor ``name``; reads only those bytes."""
        from safetensors import safe_open

        if dim not in (0, 1):
            raise ValueError(f"read({name}): dim={dim}; only 0 and 1 are split")
        with safe_open(str(self.hf_dir / self._file_of[name]), framework="pt") as handle:
            tensor_slice = handle.get_slice(name)
            return tensor_slice[start:stop] if dim == 0 else tensor_slice[:, start:stop]


def _check_hf_names(hf: HFSafetensors, table: MappingTable, num_layers: int) -> set[str]:
    expected = table.expected_hf_names(num_layers)
    present = {n for n in hf.names() if not table.is_ignored(n)}
    problems = []
    if expected - present:
        problems.append(f"missing {len(expected - present)} tensor(s): {_listing(expected - present)}")
    if present - expected:
        problems.append(f"{len(present - expected)} tensor(s) not used by mapping table '{table.name}': "
                        f"{_listing(present - expected)}")
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
    with HFSafetensors(hf_dir) as hf:
        _check_hf_names(hf, table, model_cfg.num_layers)


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
        raise ValueError(f"HF tensors consumed more than once on rank {dist.get_rank()}: {_listing(twice)}")
    everywhere: list[set[str]] = collectives.all_gather_object(set(consumed))
    unconsumed = expected - set().union(*everywhere)
    if unconsumed:
        raise ValueError(f"HF tensors no rank loaded (model lacks the parameters the table expects): "
                         f"{_listing(unconsumed)}")


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
    with HFSafetensors(hf_dir) as hf:
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
    with HFSafetensors(hf_dir) as hf:
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


class HFShards(NamedTuple):
    """What :func:`write_hf_safetensors` wrote."""

    weight_map: dict[str, str]
    """``{hf_name: file_name}``."""
    total_bytes: int
    """Sum of tensor bytes (the index's ``total_size``)."""


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write one safetensors file straight from the tensors' memory.

    Format (safetensors spec): u64 little-endian header size, a JSON header naming each tensor's dtype, shape
    and ``[begin, end)`` byte range in the data section (contiguous, in order), padded with spaces to 8 bytes,
    then the raw little-endian bytes. ``safetensors.torch.save_file`` first serialises every tensor to a
    ``bytes`` copy, which doubles the peak for the largest tensor.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_hf_safetensors(stream: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, *,
                         prefix: str = "model", max_shard_bytes: int = 2**30) -> HFShards:
    """Write a tensor stream as safetensors shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    Memory stays near ``max_shard_bytes`` plus one tensor. Files are named ``{prefix}-{i:05d}.safetensors``;
    the caller writes the index (:func:`write_hf_index`), possibly merging several writers' maps.

    Raises:
        ValueError: a name appears twice in the stream.
    """
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            file_name = f"{prefix}-{len(set(weight_map.values())) + 1:05d}.safetensors"
            _save_safetensors(pending, out_dir / file_name)
            weight_map.update(dict.fromkeys(pending, file_name))
            pending, pending_bytes = {}, 0

    for name, tensor in stream:
        if name in weight_map or name in pending:
            raise ValueError(f"tensor {name} appears twice in the export stream")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
        del tensor
        if pending_bytes >= max_shard_bytes:  # write a full (or single oversized) shard before pulling more
            flush()
    flush()
    return HFShards(weight_map, total_bytes)


def write_hf_index(out_dir: str | os.PathLike, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write ``model.safetensors.index.json`` for the shards in ``out_dir``."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


HF_ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
"""Copied next to exported HF weights when present (the tokenizer and config of the source model)."""


def hf_config_dict(model_cfg: Any) -> dict[str, Any]:
    """A transformers ``config.json`` for ``model_cfg`` (used when neither the checkpoint nor the caller has one)."""
    qwen3 = model_cfg.arch == "qwen3"
    return {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
        "model_type": model_cfg.arch, "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_hidden_size, "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads, "num_key_value_heads": model_cfg.num_query_groups,
        "head_dim": model_cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": model_cfg.rms_norm_eps,
        "rope_theta": model_cfg.rope_theta, "max_position_embeddings": model_cfg.max_position_embeddings,
        "tie_word_embeddings": model_cfg.tie_word_embeddings, "attention_bias": not qwen3,
        "torch_dtype": model_cfg.params_dtype, "use_cache": True,
    }


def hf_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The ``torch_dtype`` (transformers 4) or ``dtype`` (5) of an HF config, if it names one."""
    name = config.get("torch_dtype") or config.get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


def finish_hf_dir(tmp: Path, shard_maps: list[Any], assets: Path | None, model_cfg: Any) -> None:
    """Name the shards ``model-0000i-of-0000n``, write the index, copy config/tokenizer files from ``assets``
    (else generate config.json from ``model_cfg``). Run once (rank 0) after every writer finished."""
    files = [f for m in shard_maps for f in dict.fromkeys(m.weight_map.values())]
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        os.replace(tmp / old, tmp / new)
    weight_map = {name: renamed[f] for m in shard_maps for name, f in m.weight_map.items()}
    write_hf_index(tmp, weight_map, sum(m.total_bytes for m in shard_maps))
    copied = []
    if assets is not None:
        for name in HF_ASSET_FILES:
            if (assets / name).is_file():
                shutil.copy2(assets / name, tmp / name)
                copied.append(name)
    if "config.json" not in copied:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model_cfg), indent=2) + "\n")
    logger.info("wrote %d tensors in %d files; copied %s", len(weight_map), len(files), copied or "no assets")
