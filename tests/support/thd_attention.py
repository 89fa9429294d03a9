"""A CPU stand-in for Transformer Engine's core attention on packed THD input, so that megatron-core's THD path
(``GPTModel(..., packed_seq_params=...)``) can be tested without TE or a GPU.

Legend: T packed tokens, Hq query heads and Hkv key/value groups on this TP rank, D head dim, S segments.

What it models, from megatron-core 0.16.1: ``Attention.forward`` (``transformer/attention.py``) squeezes the batch
dimension for ``qkv_format='thd'`` (query ``[T, Hq, D]``, key/value ``[T, Hkv, D]``), applies RoPE per segment
with ``cu_seqlens_q_padded`` if set, else ``cu_seqlens_q``, calls
``core_attention(query, key, value, attention_mask, attn_mask_type=..., attention_bias=..., packed_seq_params=...)``
and reshapes the result to ``[T, 1, Hq*D]``; ``TEDotProductAttention`` (``extensions/transformer_engine.py``) is
built with ``(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale, k_channels,
v_channels, num_splits, cp_comm_type, pg_collection)`` and hands the ``PackedSeqParams`` fields to TE, which
attends causally inside each segment (``padding_causal``: sequence i holds ``cu_seqlens[i+1] - cu_seqlens[i]``
real tokens starting at ``cu_seqlens_padded[i]``) and returns ``[T, Hq*D]``, zero at padding positions.

What it does not model: TE's kernels and their numerics (bf16 flash/cuDNN accumulation), context parallelism,
dropout, sliding windows, attention bias, softmax offsets. Everything it cannot check is refused, and every input
TE would reject or misread (wrong dtype or device of ``cu_seqlens``, a ``max_seqlen`` below a segment's length,
boundaries that do not cover the row) raises, so a wrong ``PackedSeqParams`` fails a test instead of passing.
Without ``packed_seq_params`` it delegates to megatron's own local ``DotProductAttention``, so the padded path of
a model built with it is exactly the local spec's.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                            cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
                            cu_seqlens_padded: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention inside each segment of a packed row, one segment at a time (written for clarity).

    Args:
        query: [T, Hq, D]; key, value: [T, Hkv, D] (Hq a multiple of Hkv: grouped-query attention). Any float
            dtype; scores and softmax run in at least float32 (float64 stays float64).
        cu_seqlens: [S+1] int32, real-token prefix sums: segment i holds ``cu_seqlens[i+1] - cu_seqlens[i]`` tokens.
        max_seqlen: the longest segment (TE sizes its kernels by it, so a smaller value is refused).
        softmax_scale: multiplies q.k (usually 1/sqrt(D)).
        cu_seqlens_padded: [S+1] int32 offsets of each segment in the row (segment i starts at
            ``cu_seqlens_padded[i]``, its padding runs to ``cu_seqlens_padded[i+1]``); None = ``cu_seqlens``.

    Returns:
        [T, Hq*D] in ``query``'s dtype, zero at padding positions.

    Raises:
        ValueError: on anything TE would reject or silently misread (see the module docstring).
    """
    extent = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
    t, hq, d = query.shape
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_padded", extent)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of S+1 >= 2 entries, got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != query.device:
            raise ValueError(f"{name} is on {cu.device}, the attention input on {query.device}")
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must start at 0 and never decrease: {cu.tolist()}")
    if extent.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries, cu_seqlens_padded {extent.numel()}")
    if int(extent[-1]) != t:
        raise ValueError(f"segments cover {int(extent[-1])} tokens, the packed row has T={t}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    room = (extent[1:] - extent[:-1]).tolist()
    if any(n > r for n, r in zip(lengths, room)):
        raise ValueError(f"a segment is longer than its padded extent: lengths {lengths}, extents {room}")
    if not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen={max_seqlen!r} must be an int >= the longest segment {max(lengths)}")
    if hq % key.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {key.shape[1]} key/value groups")
    compute = torch.promote_types(query.dtype, torch.float32)
    group = hq // key.shape[1]
    out = torch.zeros(t, hq, d, dtype=compute, device=query.device)
    for start, n in zip(extent[:-1].tolist(), lengths):
        q = query[start:start + n].to(compute).transpose(0, 1)  # [Hq, n, D]
        k = key[start:start + n].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        v = value[start:start + n].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) * softmax_scale  # [Hq, n, n]
        future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out[start:start + n] = (probs @ v).transpose(0, 1)
    return out.to(query.dtype).reshape(t, hq * d)


class ThdReferenceAttention(MegatronModule):
    """Core attention with TEDotProductAttention's constructor and forward contract, THD by
    :func:`varlen_causal_attention`, everything else by megatron's local ``DotProductAttention``."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, num_splits: int | None = None,
                 cp_comm_type: str | None = "p2p", pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("ThdReferenceAttention does not model context parallelism")
        self.attn_mask_type = attn_mask_type
        self.local = DotProductAttention(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                                         attention_type=attention_type, attention_dropout=attention_dropout,
                                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type,
                                         pg_collection=pg_collection)
        head_dim = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None,
                num_splits: int | None = None) -> torch.Tensor:
        """``[T, Hq, D]`` THD inputs -> ``[T, Hq*D]``; ``[s, b, H, D]`` inputs -> megatron's local attention."""
        if packed_seq_params is None:
            return self.local(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias)
        p = packed_seq_params
        mask_type = attn_mask_type or self.attn_mask_type
        if p.qkv_format != "thd" or query.dim() != 3:
            raise ValueError(f"qkv_format={p.qkv_format!r}, {query.dim()}-d query: only THD [T, H, D] is modelled")
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("THD attention takes its segments from cu_seqlens: attention_mask/bias must be None")
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type={mask_type.name}: only causal/padding_causal is modelled")
        same_kv = p.cu_seqlens_kv is not None and torch.equal(p.cu_seqlens_q, p.cu_seqlens_kv)
        if not same_kv or p.max_seqlen_q != p.max_seqlen_kv:
            raise ValueError("self-attention: cu_seqlens_kv/max_seqlen_kv must equal cu_seqlens_q/max_seqlen_q")
        return varlen_causal_attention(query, key, value, cu_seqlens=p.cu_seqlens_q, max_seqlen=p.max_seqlen_q,
                                       softmax_scale=self.softmax_scale, cu_seqlens_padded=p.cu_seqlens_q_padded)


def thd_layer_spec(local_spec: Any) -> Any:
    """A copy of megatron's local GPT layer spec whose core attention is :class:`ThdReferenceAttention`."""
    spec = copy.deepcopy(local_spec)
    spec.submodules.self_attention.submodules.core_attention = ThdReferenceAttention
    return spec
