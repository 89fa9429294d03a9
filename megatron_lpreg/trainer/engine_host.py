"""Where a step's rollouts come from, and how new weights reach them.

embedded: ``rollout.engine=local`` with pp == 1 (``Colocation.EMBEDDED``, ``rollout.factory.runs_embedded``):
    every rank runs the in-process engine on its own parameter shard (TP ranks of one replica in lockstep, each DP
    replica on its own prompt slice); no weights move.
hosted:  sglang / vllm, or ``local`` with pp > 1 (the in-process engine cannot run a pipeline): global rank 0
    owns the engine(s), generates for the whole step and broadcasts the completions; after each update the
    trainer streams HF-named tensors to rank 0 (:func:`stream_weights_to_rank0`: TP shards all-gathered inside
    each stage, later pipeline stages sent tensor by tensor), which feeds them to ``engine.update_weights``;
    engines that read per-tensor checksums (local, vLLM) get them, SGLang none. Colocated SGLang with
    ``weight_sync=tensor`` (``auto``) instead gets every engine TP rank's payload from the trainer rank on its own
    GPU (``trainer/colocated_sync.py``). Whether a hosted engine shares the trainer's GPUs is its own
    ``colocation`` (``rollout.base.Colocation``); the release/resume calls below act only where it does.

Order around an update (hosted engines, every rank): rank 0 releases every engine's memory, barrier, the update,
every rank frees its cache, barrier, rank 0 resumes every engine, barrier, then the weight sync.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from megatron_lpreg.config import RunConfig
from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.rollout.base import Completion, LogprobProbe, SamplingParams, WeightUpdate
from megatron_lpreg.rollout.weight_sync import checksum

logger = logging.getLogger(__name__)

_END = "__end_of_stage__"
CHECKSUM_READERS = ("local", "vllm")
"""Engines whose update_weights verifies ``WeightUpdate.checksums``; SGLang never reads them, so none are computed
for it (each is a float64 pass over a full tensor on rank 0)."""
_UNKNOWN = object()


class EngineHost:
    """The step's rollout engine, embedded in every rank or hosted on global rank 0."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, model_chunks: list) -> None:
        from megatron_lpreg.rollout.factory import build_engine, runs_embedded

        self.cfg, self.ctx, self.chunks = cfg, ctx, model_chunks
        self.hosted = not runs_embedded(cfg.rollout, pp_size=ctx.pp_size, vpp_size=ctx.vpp_size)
        self.engine = None
        self._routes: Any = _UNKNOWN
        """Colocated tensor sync: engine TP rank -> feeding trainer rank (None: rank 0 feeds all); learned at the
        first sync."""
        if not self.hosted:
            self.engine = build_engine(cfg.rollout, cfg.model.hf_path, seed=cfg.seed, model=model_chunks)
        elif ctx.rank == 0 and cfg.rollout.engine_fleet and _in_ray():
            self.engine = _attach_fleet(cfg)
        elif ctx.rank == 0 and cfg.rollout.placement == "actor":
            from megatron_lpreg.rollout.ray_actor import RayEngine

            self.engine = RayEngine(cfg.rollout, cfg.model.hf_path, seed=cfg.seed)
        elif ctx.rank == 0:
            # A hosted local engine is a transformers copy of the initial weights, refreshed after every update.
            self.engine = build_engine(cfg.rollout, cfg.model.hf_path, seed=cfg.seed, model=None)
        if self.hosted:
            logger.info("rollout engine '%s' hosted on rank 0 (pp=%d)", cfg.rollout.engine, ctx.pp_size)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Completions for ``prompts`` (this rank's DP slice when embedded, the whole step when hosted)."""
        if not self.hosted:
            return self.engine.generate(prompts, params)
        return coll.broadcast_object(self.engine.generate(prompts, params) if self.ctx.rank == 0 else None, src=0)

    def update_weights(self, version: int, probe: LogprobProbe | None = None) -> None:
        """Embedded: announce the version. Hosted: stream the new weights to rank 0's engine (collective), with
        ``probe`` (the trainer's log-probs with these weights) for the engine to check after the sync."""
        if not self.hosted:
            self.engine.update_weights(WeightUpdate(version=version))
            return
        if self._colocated_tensor_sync():
            from megatron_lpreg.trainer.colocated_sync import colocated_payloads, runtime_routes

            if self._routes is _UNKNOWN:
                servers = getattr(self.engine, "servers", None)
                self._routes = runtime_routes(self.ctx, servers.engines if servers is not None else None)
            if self._routes is not None:
                bucket_bytes = int(self.cfg.rollout.weight_bucket_mb * 2**20)
                payloads = colocated_payloads(self.chunks, self.cfg.model, self.ctx, self._routes, bucket_bytes)
                self._feed(WeightUpdate(version=version, payloads=payloads, probe=probe), payloads)
                return
        checksums: dict[str, float] = {}
        wanted = checksums if self.cfg.rollout.engine in CHECKSUM_READERS else None
        stream = stream_weights_to_rank0(self.chunks, self.cfg.model, self.ctx, checksums=wanted)
        self._feed(WeightUpdate(version=version, tensors=stream, checksums=checksums, probe=probe), stream)

    def _feed(self, update: WeightUpdate, stream: Iterator) -> None:
        """Rank 0 hands ``update`` (whose stream is collective) to its engine; the others drain ``stream``."""
        if self.ctx.rank == 0:
            self.engine.update_weights(update)
        else:
            for _ in stream:
                pass

    def _colocated_tensor_sync(self) -> bool:
        rollout = self.cfg.rollout
        return rollout.engine == "sglang" and rollout.mode == "colocated" and rollout.resolved_weight_sync() == "tensor"

    def release_memory(self) -> None:
        """Before the update: rank 0 releases every engine's device memory (acts only for a
        ``Colocation.COLOCATED`` engine); then every rank waits for it, so no rank's update allocates on a GPU an
        engine still holds."""
        if self.engine is not None:
            self.engine.release_memory()
        self._barrier()

    def resume_memory(self) -> None:
        """After the update, before the weight sync: every rank frees its cached device memory, then (once all
        have) the engines take theirs back, and every rank waits for that before the sync allocates."""
        if torch.cuda.is_available():
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        self._barrier()  # a colocated engine shares GPUs with every rank: resume once all have freed
        if self.engine is not None:
            self.engine.resume_memory()
        self._barrier()

    def _barrier(self) -> None:
        """All ranks, for hosted engines (an embedded engine lives in every rank and needs no wait)."""
        if self.hosted and self.ctx.world_size > 1:
            coll.barrier()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def _in_ray() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _attach_fleet(cfg: RunConfig) -> Any:
    """The SGLang engines the Ray launcher placed on the cluster (rollout.engine_fleet), as one engine."""
    from megatron_lpreg.rollout.sglang import SGLangEngine
    from megatron_lpreg.rollout.sglang_servers import RayServers

    servers = RayServers.attach(cfg.rollout.engine_fleet, cfg.rollout.num_engines, cfg.rollout.max_engine_restarts)
    return SGLangEngine(cfg.rollout, cfg.model.hf_path, seed=cfg.seed, servers=servers)


def stream_weights_to_rank0(model_chunks: list, model_cfg: Any, ctx: ParallelContext, *,
                            checksums: dict[str, float] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective generator: on global rank 0 it yields every HF tensor of the model, one at a time; on other
    ranks it yields nothing but must be drained (TP peers join the all-gathers, stage leaders send).

    Only data-parallel replica 0 takes part in sending; other replicas hold the same weights. ``checksums``
    (rank 0) is filled with each tensor's float64 sum as it passes, for the engine to verify afterwards.
    """
    from megatron_lpreg.models.bridge import export_hf_weights

    leaders = _stage_leaders(ctx) if ctx.world_size > 1 else {0: 0}
    if ctx.dp_rank != 0:
        return
    for stage in range(ctx.pp_size):
        leader = leaders[stage]
        if ctx.pp_rank == stage:
            for name, tensor in export_hf_weights(model_chunks, model_cfg, ctx):
                if ctx.rank == 0:
                    if checksums is not None:
                        checksums[name] = checksum(tensor)
                    yield name, tensor
                elif ctx.tp_rank == 0:
                    coll.send_object((name, tuple(tensor.shape), tensor.dtype), dst=0)
                    coll.send(tensor, dst=0)
            if ctx.rank == leader and leader != 0:
                coll.send_object((_END, None, None), dst=0)
        elif ctx.rank == 0:
            while True:
                name, shape, dtype = coll.recv_object(src=leader)
                if name == _END:
                    break
                tensor = coll.recv(coll.empty(shape, ctx, dtype), src=leader)
                if checksums is not None:
                    checksums[name] = checksum(tensor)
                yield name, tensor


def _stage_leaders(ctx: ParallelContext) -> dict[int, int]:
    """pp stage -> global rank of its (tp 0, dp 0) member, learned from every rank (no rank-order assumption)."""
    coords = coll.all_gather_object((ctx.pp_rank, ctx.tp_rank, ctx.dp_rank, ctx.rank))
    return {pp: rank for pp, tp, dp, rank in coords if tp == 0 and dp == 0}
