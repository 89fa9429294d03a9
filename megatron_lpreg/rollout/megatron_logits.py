"""LogitsModel over the trainer's megatron-core GPTModel: generation reads the trainer's parameters in place.

Shapes: B rows, S tokens, Vp padded vocab (all TP shards gathered), V real vocab.

KV cache: megatron's ``StaticInferenceContext`` (prefill once, then one token per step). Megatron's static batching
takes rotary positions from the KV slot, not from ``position_ids``; prompts are left-padded, so a padded row's
positions are shifted by its pad count. RoPE attention depends only on position differences, so this changes
results only by float rounding, and padded keys are masked explicitly (the mask is passed at every step, True =
masked, megatron's convention). Requires PP=1 (one chunk holding both embedding and output layer).

**Padding and the Transformer Engine spec.** Only megatron's local core attention applies the mask passed in
(``DotProductAttention`` -> ``FusedScaleMaskSoftmax``). ``TEDotProductAttention`` hands TE the layer's mask *type*
(megatron-core 0.16.1 extensions/transformer_engine.py:1400-1410), and TE reads ``attention_mask`` only for the
padding/arbitrary types: the prefill runs ``causal`` and, from the first decode step on, ``Attention`` switches the
type to ``no_mask`` whenever it is not training (transformer/attention.py:511-520). So on TE a left-padded row would
attend to its pad keys at every step. :attr:`MegatronLogitsModel.masks_padding` says which case holds; when it is
False the engine batches only prompts of one length (``LocalEngine.generate_rows``), so no row has padding.

TP>1: every TP rank must run the same generation in lockstep (same prompts, same seeds). The output layer gives
each rank a vocab shard; it is asked to all-gather them over its own TP group (``runtime_gather_output=True``,
which megatron requires in inference mode anyway), the padded vocab tail is cut off, and because all ranks then
hold bit-identical logits their seeded samplers draw identical tokens.
"""
from __future__ import annotations

import logging

import torch

from megatron_lpreg.models.bridge import unwrap

logger = logging.getLogger(__name__)


class MegatronLogitsModel:
    """LogitsModel over a megatron-core GPTModel (see module docstring)."""

    def __init__(self, model: torch.nn.Module, *, vocab_size: int) -> None:
        """Args:
            model: the trainer's model chunk (GPTModel, possibly DDP/Float16Module-wrapped); not copied.
            vocab_size: real vocabulary V (the tokenizer's); the padded tail of the output layer is dropped.

        Raises:
            ValueError: the chunk is not a whole model (pipeline parallelism) or vocab_size exceeds the model's.
        """
        inner = unwrap(model)
        if not (getattr(inner, "pre_process", False) and getattr(inner, "post_process", False)):
            raise ValueError(
                "the local rollout engine needs the whole model on each rank (parallel.pp=1, parallel.vpp=1); "
                "use rollout.engine=sglang or vllm with pipeline parallelism"
            )
        self.model = model
        self.inner = inner
        padded = inner.vocab_size
        if vocab_size > padded:
            raise ValueError(f"vocab_size={vocab_size} exceeds the model's padded vocabulary {padded}")
        self.vocab_size = vocab_size
        self.max_length = int(inner.max_sequence_length)
        self._context = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._was_training = model.training
        self.masks_padding = _core_attention_applies_masks(inner)
        """Whether left padding can be masked (megatron's local attention); False on the TE spec (module docstring)."""

    @property
    def device(self) -> torch.device:
        """The rank's device (where the trainer's parameters live)."""
        return next(self.model.parameters()).device

    def _real_vocab(self, logits_BVp: torch.Tensor) -> torch.Tensor:
        return logits_BVp[..., : self.vocab_size].float()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, query_len: int) -> torch.Tensor:
        keys = self._mask.shape[1]
        # True = masked: padded keys, and (prefill) future keys
        blocked = ~self._mask[:, None, None, :].expand(-1, 1, query_len, keys)
        if query_len > 1:
            future = torch.triu(torch.ones(query_len, keys, dtype=torch.bool, device=self._mask.device),
                                diagonal=keys - query_len + 1)
            blocked = blocked | future
        logits_BSVp = self.model(
            input_ids, positions, blocked, inference_context=self._context, runtime_gather_output=True
        )
        self._context.sequence_len_offset += query_len
        return self._real_vocab(logits_BSVp[:, -1, :])

    @torch.no_grad()
    def prefill(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, max_length: int) -> torch.Tensor:
        from megatron.core.inference.contexts import StaticInferenceContext

        self._was_training = self.model.training
        self.model.eval()
        batch = input_ids_BS.shape[0]
        self._context = StaticInferenceContext(batch, max_length)
        self._mask = attention_mask_BS.to(self.device, torch.bool)
        positions = (self._mask.long().cumsum(-1) - 1).clamp(min=0)
        self._positions = positions[:, -1]
        logits = self._forward(input_ids_BS.to(self.device), positions, input_ids_BS.shape[1])
        self._context.enable_decode_mode()
        return logits

    @torch.no_grad()
    def decode(self, token_ids_B: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None and self._positions is not None, "decode() before prefill()"
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=-1)
        self._positions = self._positions + 1
        return self._forward(token_ids_B.to(self.device)[:, None], self._positions[:, None], 1)

    def keep_rows(self, rows_B: torch.Tensor) -> None:
        assert self._mask is not None and self._positions is not None, "keep_rows() before prefill()"
        # static KV memory is [max_seq, max_batch, ...] per layer: shrinking the batch axis is a plain index
        rows_B = rows_B.to(self.device)
        memory = self._context.key_value_memory_dict
        for layer, (keys, values) in memory.items():
            memory[layer] = (keys[:, rows_B], values[:, rows_B])
        self._context.max_batch_size = int(rows_B.numel())
        self._mask, self._positions = self._mask[rows_B], self._positions[rows_B]

    def release(self) -> None:
        self._context, self._mask, self._positions = None, None, None
        self.model.train(self._was_training)

    @torch.no_grad()
    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.tensor([token_ids], device=self.device)
            positions = torch.arange(len(token_ids), device=self.device)[None, :]
            logits_1SVp = self.model(ids, positions, None, runtime_gather_output=True)
        finally:
            self.model.train(was_training)
        return self._real_vocab(logits_1SVp[0])


def _core_attention_applies_masks(model: torch.nn.Module) -> bool:
    """True when every layer's core attention is megatron's local ``DotProductAttention``, the one that applies the
    ``attention_mask`` it is given at every step (prefill and decode); any other (Transformer Engine) does not."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(core, DotProductAttention) for core in cores)
