"""Bytes moved and modelled time of one colocated tensor weight sync (``trainer/colocated_sync.py``), per GPU.

Pure arithmetic over the config (no torch). The sync's phases, as the code runs them, tensor by tensor and stage by
stage (stage s's tensors, then stage s+1's; nothing overlaps):

1. TP all-gather inside stage s: each of its ranks receives ``(tp - 1) / tp`` of the stage's bytes (ring
   all-gather), over NVLink when the TP group sits on one node;
2. pipeline broadcast of stage s's full tensors to the other stages over each pipeline group (one GPU per stage,
   same TP and DP rank): every rank of another stage receives the stage's bytes once, over the inter-node links
   when the stages sit on different nodes (each GPU has its own NIC, so the pipeline groups run in parallel);
3. CUDA IPC handles to the engine TP rank on the same GPU: no bytes cross a link; SGLang's loader copies its shard
   out of the full tensor in HBM (not counted).

So each GPU receives the whole model once, minus the shards it already held. Stage bytes: HF tensors in
``model.params_dtype`` with the vocabulary unpadded (what the engines load), the first stage holding the embedding,
the last the final norm and (untied) the output layer, layers split as megatron splits them
(``config.model.pipeline_layers``). Rank r sits at TP rank ``r % tp``, DP rank ``(r // tp) % dp``, stage
``r // (tp dp)`` (megatron's default order tp-dp-pp) on node ``r // gpus_per_node``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_lpreg.config.model import ModelConfig, ParallelConfig, pipeline_layers
from megatron_lpreg.models.footprint import DTYPE_BYTES, parameter_count

NVLINK_GBPS = 450.0
"""GB/s per direction per GPU inside a node: H100 SXM NVLink 4 is 900 GB/s bidirectional (450 each way), taken as
the effective all-gather bus bandwidth (NCCL reaches ~360-450 GB/s busbw on 8 x H100)."""
INTERNODE_GBPS = 50.0
"""GB/s per GPU between nodes: one 400 Gb/s InfiniBand NDR NIC per GPU = 50 GB/s line rate (NCCL typically reaches
~40-48 GB/s)."""


@dataclass(frozen=True)
class SyncCost:
    """One sync, per GPU (every GPU does the same work; phases do not overlap)."""

    total_bytes: int
    """HF bytes of the whole model (what every engine TP rank receives)."""
    stage_bytes: tuple[int, ...]
    nvlink_bytes: int
    """Received per GPU over NVLink (TP all-gathers), the largest over ranks."""
    internode_bytes: int
    """Received per GPU over the inter-node links (pipeline broadcasts), the largest over ranks."""
    seconds: float
    """Modelled time: sum over stages of all-gather time + broadcast time."""
    nvlink_gbps: float
    internode_gbps: float

    def lines(self) -> list[str]:
        """Human-readable summary."""
        gb = 1e9
        return [
            f"model bytes per sync: {self.total_bytes / gb:.1f} GB (stages: "
            f"{', '.join(f'{b / gb:.1f}' for b in self.stage_bytes)} GB)",
            f"per GPU: {self.nvlink_bytes / gb:.1f} GB over NVLink (TP all-gather, {self.nvlink_gbps:g} GB/s), "
            f"{self.internode_bytes / gb:.1f} GB between nodes (pipeline broadcast, {self.internode_gbps:g} GB/s), "
            f"0 B to the engine (CUDA IPC on the same GPU)",
            f"modelled time per sync: {self.seconds:.2f} s",
        ]


def stage_bytes(model: ModelConfig, parallel: ParallelConfig) -> list[int]:
    """HF bytes each pipeline stage exports (unpadded vocabulary, ``model.params_dtype``)."""
    flat = dataclasses.replace(model, make_vocab_size_divisible_by=1)  # HF tensors carry the true vocabulary
    per_layer = parameter_count(dataclasses.replace(flat, num_layers=1)) - parameter_count(
        dataclasses.replace(flat, num_layers=0))
    embedding = model.vocab_size * model.hidden_size
    layers = pipeline_layers(model.num_layers, parallel)
    params = [n * per_layer for n in layers]
    params[0] += embedding
    params[-1] += model.hidden_size + (0 if model.tie_word_embeddings else embedding)
    return [p * DTYPE_BYTES[model.params_dtype] for p in params]


def colocated_sync_cost(model: ModelConfig, parallel: ParallelConfig, world_size: int, gpus_per_node: int, *,
                        nvlink_gbps: float = NVLINK_GBPS, internode_gbps: float = INTERNODE_GBPS) -> SyncCost:
    """Bytes and modelled time of one colocated tensor sync (see the module docstring)."""
    tp, pp = parallel.tp, parallel.pp
    dp = world_size // (tp * pp)
    stages = stage_bytes(model, parallel)
    node = [r // gpus_per_node for r in range(world_size)]
    tp_cross = any(node[r] != node[r - r % tp] for r in range(world_size))
    pp_cross = any(node[r] != node[r % (tp * dp)] for r in range(world_size))
    nvlink = internode = 0
    seconds = 0.0
    for size in stages:
        gathered = size * (tp - 1) // tp
        seconds += gathered / 1e9 / (internode_gbps if tp_cross else nvlink_gbps)
        if pp > 1:
            seconds += size / 1e9 / (internode_gbps if pp_cross else nvlink_gbps)
    for size in stages:  # what one rank of each stage receives
        own = size * (tp - 1) // tp
        others = sum(stages) - size if pp > 1 else 0
        nv = (0 if tp_cross else own) + (0 if pp_cross else others)
        ib = (own if tp_cross else 0) + (others if pp_cross else 0)
        nvlink, internode = max(nvlink, nv), max(internode, ib)
    return SyncCost(total_bytes=sum(stages), stage_bytes=tuple(stages), nvlink_bytes=nvlink,
                    internode_bytes=internode, seconds=seconds, nvlink_gbps=nvlink_gbps,
                    internode_gbps=internode_gbps)
