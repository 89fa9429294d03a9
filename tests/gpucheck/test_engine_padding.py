"""The gpucheck part that runs the local engine on uneven prompt lengths, batched vs alone, here on the CPU's local
spec (on a GPU node it runs on the Transformer Engine spec too; tests/rollout/test_megatron_logits.py models TE's
mask handling on CPU)."""
from __future__ import annotations

from megatron_lpreg.gpucheck.engine_padding import UNEVEN_PROMPTS, padded_batch_parity
from tests.support.tiny import tiny_model_dir


def test_uneven_prompts_batched_equal_each_alone_on_the_local_spec():
    assert len({len(p) for p in UNEVEN_PROMPTS}) == len(UNEVEN_PROMPTS)  # every batched row but one is padded
    result = padded_batch_parity(tiny_model_dir("qwen2"), "local")
    assert result["masks_padding"] and result["same_tokens"]
    assert result["max_abs_logprob_diff"] <= result["tolerance"]
