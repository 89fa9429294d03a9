"""GPU-check part of ``model_parity``: the local rollout engine on prompts of uneven lengths, batched against
each prompt alone, on the checked device and layer spec.

Batched, shorter prompts are left-padded. Megatron's local attention masks the pad keys; on the Transformer Engine
spec the mask is not applied (TE reads only the mask type, and megatron switches it to ``no_mask`` for decode:
see :mod:`megatron_lpreg.rollout.megatron_logits`), so there the engine batches prompts of one length only. Either
way the greedy tokens and their log-probs must equal those of each prompt generated alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

UNEVEN_PROMPTS = ((5, 6, 7), (9, 10, 11, 12, 13, 14, 15), (42,), (7, 8, 9, 10, 11))
"""Four lengths: batched together, three of the four rows carry left padding."""
NEW_TOKENS = 8
TOLERANCE = 1e-4
"""fp32 log-probs, batched vs alone: the same math at RoPE positions shifted by the padding (~1e-6 on CPU)."""


def _rank(rank: int, world: int, model_cfg: Any, hf_dir: str) -> dict[str, Any]:
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.models.qwen import build_model_chunks
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel
    from megatron_lpreg.rollout.base import SamplingParams
    from megatron_lpreg.rollout.local import LocalEngine
    from megatron_lpreg.rollout.megatron_logits import MegatronLogitsModel

    ctx = init_parallel(ParallelConfig(), seed=0)
    try:
        chunks = build_model_chunks(model_cfg, ParallelConfig())
        load_hf_weights(chunks, hf_dir, model_cfg, ctx)
        engine = LocalEngine(MegatronLogitsModel(chunks[0], vocab_size=model_cfg.vocab_size))
        greedy = SamplingParams(top_k=1, max_new_tokens=NEW_TOKENS)
        prompts = [list(p) for p in UNEVEN_PROMPTS]
        batched = engine.generate(prompts, greedy)
        alone = [engine.generate([p], greedy)[0] for p in prompts]
        same_tokens = all(b.response_ids == a.response_ids for b, a in zip(batched, alone))
        diff = max((abs(x - y) for b, a in zip(batched, alone) for x, y in zip(b.logprobs, a.logprobs)),
                   default=0.0)
        return {"masks_padding": engine.model.masks_padding, "same_tokens": same_tokens,
                "max_abs_logprob_diff": diff if same_tokens else float("inf"), "tolerance": TOLERANCE}
    finally:
        destroy_parallel(destroy_process_group=False)


def padded_batch_parity(hf_dir: Path, impl: str) -> dict[str, Any]:
    """Batched vs alone on the ``impl`` layer spec (``local`` or ``transformer_engine``), fp32, one rank."""
    from megatron_lpreg.models.convert import run_job
    from megatron_lpreg.models.qwen import model_config_from_hf

    model_cfg = dataclasses.replace(model_config_from_hf(hf_dir), transformer_impl=impl)
    with torch.no_grad():
        return run_job(_rank, 1, model_cfg, str(hf_dir), timeout_s=600.0)[0]
