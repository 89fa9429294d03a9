"""A CPU stand-in for how Transformer Engine's core attention treats masks on the padded (non-THD) path, so that
the local engine's handling of left padding on the TE spec can be tested without TE or a GPU.

What it models, from megatron-core 0.16.1: ``TEDotProductAttention.forward`` (extensions/transformer_engine.py:
1400-1410) passes TE the mask *type* it is given; TE reads ``attention_mask`` only for the ``padding*``/``arbitrary``
types, and megatron's GPT layers use ``causal``, which ``Attention`` turns into ``no_mask`` for every decode step
outside training (transformer/attention.py:511-520). So: ``causal`` = a causal mask over the keys given (prefill,
queries and keys of one length), ``no_mask`` = nothing masked; ``attention_mask`` is never read. The scores
themselves come from megatron's own local ``DotProductAttention`` (given no mask, it builds the causal one itself
for more than one query).

What it does not model: TE's kernels and numerics, other mask types (refused), sliding windows, context
parallelism, dropout.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class MaskTypeOnlyAttention(MegatronModule):
    """Core attention with TEDotProductAttention's constructor and forward contract that applies only the mask type."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, num_splits: int | None = None,
                 cp_comm_type: str | None = "p2p", pg_collection: Any = None) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.local = DotProductAttention(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                                         attention_type=attention_type, attention_dropout=attention_dropout,
                                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type,
                                         pg_collection=pg_collection)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None,
                num_splits: int | None = None) -> torch.Tensor:
        """``[s, b, H, D]`` inputs; ``attention_mask`` is ignored, as TE ignores it for causal/no_mask."""
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("MaskTypeOnlyAttention models the padded path only (no THD, no attention bias)")
        if mask_type == AttnMaskType.causal and query.shape[0] != key.shape[0]:
            raise ValueError("causal with queries and keys of different lengths (TE: top-left) is not modelled")
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"attn_mask_type={mask_type.name} is not modelled (only causal and no_mask)")
        return self.local(query, key, value, None, attn_mask_type=mask_type)


def mask_type_only_layer_spec(local_spec: Any) -> Any:
    """A copy of megatron's local GPT layer spec whose core attention is :class:`MaskTypeOnlyAttention`."""
    spec = copy.deepcopy(local_spec)
    spec.submodules.self_attention.submodules.core_attention = MaskTypeOnlyAttention
    return spec
