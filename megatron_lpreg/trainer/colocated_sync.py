"""Colocated weight sync by tensor: every SGLang engine TP rank receives each full HF tensor from the trainer rank on
its own GPU.

A colocated engine shares every GPU with a trainer rank, and NCCL refuses two ranks of one communicator on one GPU,
so no broadcast group may join trainer and engine. Instead (``rollout.weight_sync=tensor``, what ``auto`` means for
colocated SGLang):

1. every trainer rank builds every full HF tensor (:func:`full_hf_tensors`): TP shards all-gathered inside its
   pipeline stage (NVLink), then each stage's tensors broadcast to the other stages over the trainer's own
   pipeline group (the inter-node links when stages sit on different nodes). Each of these groups holds one rank
   per GPU;
2. per bucket of about ``rollout.weight_bucket_mb``, each rank serializes the bucket for the engine TP rank on its
   own GPU (``rollout/sglang_payload.py``: a CUDA IPC handle, nothing copied; CPU runs: shared memory);
3. the payload strings (a few hundred bytes per tensor) are gathered to rank 0, which owns the HTTP clients and
   posts each engine its TP ranks' payloads in TP order (``/update_weights_from_tensor``);
4. a barrier on all ranks, after the engines answered, before the bucket's tensors are freed (an engine must have
   opened the IPC handles first).

The route (engine e, TP rank i) -> trainer rank is the plan's (``rollout.placement.sync_routes``), found again at run
time from where the ranks really are (:func:`runtime_routes`: Ray node id and GPU id of every trainer rank and
every engine GPU). Bytes and modelled time per sync: ``benchmarks/colocated_sync_cost.py`` (docs/rollout.md,
"Colocated weight sync").
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.rollout.base import NamedTensor, PayloadBucket
from megatron_lpreg.rollout.placement import PlacementError, feeder_ranks
from megatron_lpreg.rollout.sglang_payload import serialize_named_tensors
from megatron_lpreg.rollout.weight_sync import iter_buckets

logger = logging.getLogger(__name__)

Routes = tuple[tuple[int, ...], ...]
"""``routes[e][i]``: the trainer rank that feeds TP rank ``i`` of engine ``e``."""


def this_gpu() -> tuple[str, int | None]:
    """(node key, GPU id) of this process: the Ray node id and the GPU id Ray assigned inside Ray, else the host
    name and the physical id of ``cuda:LOCAL_RANK`` (None without CUDA)."""
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return socket.gethostname(), None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return socket.gethostname(), int(visible[local]) if local < len(visible) and visible[local].isdigit() else local


def runtime_routes(ctx: ParallelContext, engines: Sequence[Any] | None) -> Routes | None:
    """Collective: the feeder of every engine TP rank, from where every rank and engine GPU really is.

    Args:
        ctx: this rank's context.
        engines: on rank 0, the engines' ``EngineInfo`` (``node_id``, ``gpus``; '' node = rank 0's own host);
            ignored elsewhere.

    Returns:
        The routes on every rank, or None (on every rank) when some engine GPU has no trainer rank on it (CPU
        runs; engines whose GPUs are unknown), where rank 0 serializes for all engines itself.
    """
    where = coll.all_gather_object(this_gpu())
    routes: Routes | None = None
    if ctx.rank == 0 and engines and all(e.gpus for e in engines):
        at = {(node, gpu): rank for rank, (node, gpu) in enumerate(where) if gpu is not None}
        try:
            routes = tuple(feeder_ranks([(e.node_id or where[0][0], tuple(e.gpus)) for e in engines], at))
        except PlacementError as exc:
            logger.warning("colocated tensor sync from trainer rank 0 only: %s", exc)
    routes = coll.broadcast_object(routes, src=0)
    if routes is not None and ctx.rank == 0:
        logger.info("colocated tensor sync: engine TP ranks fed by trainer ranks %s", [list(r) for r in routes])
    return routes


def full_hf_tensors(model_chunks: list, model_cfg: Any, ctx: ParallelContext) -> Iterator[NamedTensor]:
    """Collective generator: every rank yields every HF tensor of the model, full, stage by stage.

    The ranks of a stage all-gather the TP shards (``export_hf_weights``); when pp > 1 each stage's tensors are
    then broadcast over the pipeline group (one rank per stage, same TP and DP rank) to the other stages. Every
    rank must drain it; DP replicas work in parallel, each over its own groups.
    """
    from megatron_lpreg.models.bridge import export_hf_weights

    for stage in range(ctx.pp_size):
        if ctx.pp_size == 1:
            yield from export_hf_weights(model_chunks, model_cfg, ctx)
            return
        src = coll.global_rank(ctx.pp_group, stage)
        if ctx.pp_rank == stage:
            for name, tensor in export_hf_weights(model_chunks, model_cfg, ctx):
                coll.broadcast_object((name, tuple(tensor.shape), tensor.dtype), src=src, group=ctx.pp_group)
                coll.broadcast(tensor, src=src, group=ctx.pp_group)
                yield name, tensor
            coll.broadcast_object(None, src=src, group=ctx.pp_group)
            continue
        while (meta := coll.broadcast_object(None, src=src, group=ctx.pp_group)) is not None:
            name, shape, dtype = meta
            yield name, coll.broadcast(coll.empty(shape, ctx, dtype), src=src, group=ctx.pp_group)


def colocated_payloads(model_chunks: list, model_cfg: Any, ctx: ParallelContext, routes: Routes,
                       bucket_bytes: int) -> Iterator[PayloadBucket]:
    """Collective generator: on rank 0 one :class:`PayloadBucket` per bucket (every engine TP rank's payload,
    written by its feeder); on other ranks nothing, but they must drain it. Each bucket's tensors live until every
    rank passed the barrier that follows rank 0's posting of it (the engines have opened them by then)."""
    mine = [(e, i) for e, ranks in enumerate(routes) for i, rank in enumerate(ranks) if rank == ctx.rank]
    for bucket in iter_buckets(full_hf_tensors(model_chunks, model_cfg, ctx), bucket_bytes):
        written = {where: serialize_named_tensors(bucket) for where in mine}
        gathered = coll.gather_object(written, dst=0)
        if ctx.rank == 0:
            table = {where: payload for part in gathered for where, payload in part.items()}
            yield PayloadBucket(tensors=bucket, payloads=[[table[(e, i)] for i in range(len(ranks))]
                                                          for e, ranks in enumerate(routes)])
        coll.barrier()  # rank 0 has posted the bucket and every engine answered: its tensors may now be freed
        del bucket, written
