"""Packed sequences in megatron-core's THD layout: ``PackedSeqParams`` from segment lengths, and which attention
can read them.

Legend: T tokens of one packed row, S segments (the row's sequences, plus its tail padding when there is any).

A packed micro-batch is one row ``[1, T]`` of concatenated sequences. With ``packed_seq_params`` megatron's
``GPTModel`` squeezes the batch dimension inside attention (query ``[T, heads, head_dim]``), applies RoPE per
segment so that positions restart at 0 at every ``cu_seqlens`` boundary (``rope_utils._apply_rotary_pos_emb_thd``,
or TE's fused kernel when ``apply_rope_fusion``), and hands ``cu_seqlens``/``max_seqlen`` to the core attention,
which must attend causally inside each segment only: Transformer Engine's ``DotProductAttention`` does (megatron
maps the spec's ``causal`` mask to ``padding_causal`` for THD from TE 1.7 on). megatron's local
``DotProductAttention`` refuses ``packed_seq_params``; the local spec packs with a block-diagonal mask instead.

The tail padding (pipeline stages send one row width; sequence parallelism needs T divisible by TP) is a segment
of its own: ``cu_seqlens[-1] == T`` as megatron's THD RoPE requires (it splits the row by ``cu_seqlens``), no real
token attends to the padding, and no ``cu_seqlens_*_padded`` is needed (so no TE >= 1.10 requirement).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MIN_TE_VERSION", "attention_takes_packed_seq_params", "installed_te_version", "thd_packed_seq_params",
           "thd_unsupported_reason"]

MIN_TE_VERSION = "1.7.0"
"""Oldest Transformer Engine whose THD attention megatron-core 0.16 drives with the spec's causal mask (it maps
``causal`` to ``padding_causal`` for THD only from 1.7; older TE rejects a plain causal mask on THD input)."""


def thd_packed_seq_params(segment_lengths: Sequence[int], device: torch.device | str) -> Any:
    """megatron-core ``PackedSeqParams`` (``qkv_format='thd'``) for one packed row.

    Args:
        segment_lengths: S >= 1 positive lengths of the row's consecutive segments (each sequence, then the tail
            padding if any); they sum to the row's T.
        device: the model's device: TE reads ``cu_seqlens`` on the GPU.

    Returns:
        ``PackedSeqParams`` with ``cu_seqlens_q == cu_seqlens_kv`` = ``[0, l1, l1+l2, ..., T]`` (``[S+1]`` int32 on
        ``device``), ``max_seqlen_q == max_seqlen_kv`` = the longest segment (a Python int: no device sync) and no
        ``*_padded`` offsets.

    Raises:
        ValueError: no segment, or a segment of length < 1 (an empty segment is an empty sequence).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [int(n) for n in segment_lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"packed segment lengths must be >= 1 and at least one: got {lengths}")
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def attention_takes_packed_seq_params(model: Any) -> bool:
    """Whether ``model``'s core attention consumes ``packed_seq_params`` (THD): any core attention that is not
    megatron's local ``DotProductAttention`` (which asserts ``packed_seq_params is None``), e.g. TE's.

    A chunk without attention layers (a pipeline stage holding none) answers False.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return any(not isinstance(core, DotProductAttention) for core in cores)


def installed_te_version() -> str | None:
    """The importable Transformer Engine's version (megatron-core's reading of it), or None without TE."""
    from megatron.core.utils import get_te_version

    version = get_te_version()
    return None if version is None else str(version)


def thd_unsupported_reason(te_version: str | None) -> str | None:
    """Why Transformer Engine ``te_version`` (None: not installed) cannot run megatron-core's packed THD
    attention, or None when it can."""
    from packaging.version import Version

    if te_version is None:
        return "transformer_engine is not importable"
    if Version(te_version) < Version(MIN_TE_VERSION):
        return (f"Transformer Engine {te_version} is older than {MIN_TE_VERSION}, the first version whose THD "
                f"attention megatron-core drives with the layer spec's causal mask (as padding_causal)")
    return None
