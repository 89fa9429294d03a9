"""LogitsModel: the small adapter the in-process engine decodes through, and its Hugging Face implementation.

Shapes: B rows, S prompt length (left-padded), V real vocabulary (padding entries of a Megatron vocab removed).

A LogitsModel holds one decoding batch at a time: ``prefill`` encodes left-padded prompts and fills the KV cache,
``decode`` feeds one token per row and returns the next logits, ``keep_rows`` drops finished rows from the cache,
``release`` frees it. ``sequence_logits``
is a cache-free full forward used for teacher-forced probes (weight-sync verification). The Megatron GPTModel
adapter lives in ``megatron_logits.py``; this one wraps a ``transformers`` causal LM (used by the SGLang stand-in
server and to evaluate HF checkpoints) and can also load new weights by HF name, from tensors or from disk.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import LogprobProbe, NamedTensor

logger = logging.getLogger(__name__)


@runtime_checkable
class LogitsModel(Protocol):
    """What :class:`~megatron_lpreg.rollout.local.LocalEngine` needs from a model."""

    vocab_size: int
    """Real vocabulary size V (logits returned are [B, V])."""
    max_length: int
    """Longest prompt + response the model supports (positions)."""
    masks_padding: bool
    """Whether ``prefill``/``decode`` keep left-padded rows off their pad keys; when False the engine only batches
    prompts of equal length (Megatron on the Transformer Engine spec, see ``megatron_logits.py``)."""

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (its parameters' device); callers build token tensors there."""
        ...

    def prefill(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, max_length: int) -> torch.Tensor:
        """Encode left-padded prompts (mask 1 = real token); return the last position's logits [B, V] float32."""
        ...

    def decode(self, token_ids_B: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next logits [B, V] float32."""
        ...

    def keep_rows(self, rows_B: torch.Tensor) -> None:
        """Keep only batch rows ``rows_B`` (int64 indices into the current batch) in the cache, in that order."""
        ...

    def release(self) -> None:
        """Drop the KV cache and restore the model's train/eval mode."""
        ...

    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full forward of one sequence without cache: logits [S, V] float32 (position t predicts t+1)."""
        ...


def teacher_forced_logprobs(model: LogitsModel, token_ids: list[int], prompt_len: int) -> list[float]:
    """Log-probs (temperature 1) of ``token_ids[prompt_len:]`` given their prefix, from one cache-free forward.

    Args:
        model: any LogitsModel (on TP>1 Megatron every TP rank must call this together).
        token_ids: prompt followed by a continuation.
        prompt_len: number of prompt tokens, >= 1 and < len(token_ids).

    Returns:
        ``len(token_ids) - prompt_len`` float log-probs.
    """
    if not 1 <= prompt_len < len(token_ids):
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {len(token_ids) - 1}] for {len(token_ids)} tokens")
    logits_SV = model.sequence_logits(token_ids).double()
    logp_SV = torch.log_softmax(logits_SV[prompt_len - 1 : -1], dim=-1)
    targets = torch.tensor(token_ids[prompt_len:], dtype=torch.long, device=logp_SV.device)
    return logp_SV.gather(-1, targets[:, None]).squeeze(-1).tolist()


def make_probe(model: LogitsModel, token_ids: list[int], prompt_len: int, *, atol: float) -> LogprobProbe:
    """A weight-sync probe scored with the trainer's current weights (attach it to the next WeightUpdate).

    Args:
        model: the trainer-side adapter (e.g. ``MegatronLogitsModel`` over the policy chunk; every TP rank calls).
        token_ids: a fixed prompt + continuation, e.g. a greedy response of the previous step.
        prompt_len: number of prompt tokens.
        atol: allowed log-prob difference on the engine (see ``LogprobProbe.atol``).
    """
    expected = teacher_forced_logprobs(model, token_ids, prompt_len)
    return LogprobProbe(token_ids=tuple(token_ids), prompt_len=prompt_len, expected_logprobs=tuple(expected), atol=atol)


class HFLogitsModel:
    """LogitsModel over a ``transformers`` causal LM (Qwen2/Qwen3 or anything with a DynamicCache).

    The KV cache is transformers' ``DynamicCache``; position ids are computed from the attention mask so that
    left padding does not shift positions.
    """

    def __init__(self, model: torch.nn.Module, *, vocab_size: int | None = None) -> None:
        """Args:
            model: a ``PreTrainedModel`` with a causal-LM head; used as is (no copy).
            vocab_size: real vocabulary (default: ``model.config.vocab_size``).
        """
        self.model = model
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 1 << 20))
        self.masks_padding = True  # transformers applies attention_mask in prefill and decode
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._was_training = model.training

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> HFLogitsModel:
        """Load an HF checkpoint directory (config.json + safetensors) on CPU."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=self._mask, position_ids=positions, past_key_values=self._cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1, : self.vocab_size].float()

    @torch.no_grad()
    def prefill(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, max_length: int) -> torch.Tensor:
        from transformers import DynamicCache

        self._was_training = self.model.training
        self.model.eval()
        self._cache = DynamicCache(config=self.model.config)
        self._mask = attention_mask_BS.long()
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)
        self._positions = positions[:, -1]
        return self._forward(input_ids_BS, positions)

    @torch.no_grad()
    def decode(self, token_ids_B: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None and self._positions is not None, "decode() before prefill()"
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=-1)
        self._positions = self._positions + 1
        return self._forward(token_ids_B[:, None], self._positions[:, None])

    def keep_rows(self, rows_B: torch.Tensor) -> None:
        assert self._mask is not None and self._positions is not None, "keep_rows() before prefill()"
        self._cache.batch_select_indices(rows_B)
        self._mask, self._positions = self._mask[rows_B], self._positions[rows_B]

    def release(self) -> None:
        self._cache, self._mask, self._positions = None, None, None
        self.model.train(self._was_training)

    @torch.no_grad()
    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(input_ids=torch.tensor([token_ids], device=self.device), use_cache=False)
        finally:
            self.model.train(was_training)
        return out.logits[0, :, : self.vocab_size].float()

    # ---- weights by HF name ---------------------------------------------------------------------------------
    def named_weights(self) -> dict[str, torch.Tensor]:
        """HF-named parameters and buffers that a checkpoint holds (tied weights listed once per name)."""
        return dict(self.model.state_dict(keep_vars=True))

    @torch.no_grad()
    def load_named_tensors(self, tensors: Iterable[NamedTensor]) -> list[str]:
        """Copy ``(hf_name, tensor)`` pairs into the model in place, one at a time.

        Returns:
            The names loaded, in order.

        Raises:
            ValueError: on an unknown name or a shape mismatch (the model is left partially updated).
        """
        params = self.named_weights()
        loaded = []
        for name, tensor in tensors:
            if name not in params:
                raise ValueError(f"weight '{name}' is not a parameter of this model; e.g. {sorted(params)[:3]}")
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight '{name}': shape {tuple(tensor.shape)} != model's {tuple(target.shape)}")
            target.data.copy_(tensor.to(target.dtype))
            loaded.append(name)
        return loaded

    def load_checkpoint(self, path: str | Path) -> list[str]:
        """Reload every weight from an HF safetensors directory (``model.safetensors`` or an index of shards).

        Raises:
            ValueError: if the directory has no safetensors, or some model weight is missing from it.
        """
        names = self.load_named_tensors(hf_dir.iter_tensors(path))
        missing = set(self.named_weights()) - set(names) - _tied_names(self.model)
        if missing:
            raise ValueError(f"checkpoint {path} lacks weights {sorted(missing)[:5]} ({len(missing)} in all)")
        return names


def _tied_names(model: torch.nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()

