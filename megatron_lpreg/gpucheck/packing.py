"""Part of GPU-check section ``model_parity``: the packed THD layout (``trainer.packing`` on the Transformer Engine
spec) against the padded layout, on the same model and the same sequences, one rank.

A few sequences of different lengths run once right-padded (``[B, L]``, causal attention) and once packed into one
row (``[1, T]``) with the ``PackedSeqParams`` the trainer builds (:func:`megatron_lpreg.models.packed.
thd_packed_seq_params`); every real token's log-prob must agree. This is what the CPU tests can only show with a
stand-in for TE's attention (tests/trainer/test_packing_thd.py): here TE's own kernels, its THD RoPE kernel and
their bf16 numerics run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

LENGTHS = (17, 5, 30, 9)
"""Sequence lengths packed into one row: unequal, none a multiple of another, the longest not first."""


def _logprobs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab_size].double(), dim=-1)


def _rank_thd_vs_padded(rank: int, world: int, model_cfg: Any, hf_dir: str, lengths: tuple[int, ...],
                        seed: int) -> dict[str, Any]:
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.models.packed import attention_takes_packed_seq_params, thd_packed_seq_params
    from megatron_lpreg.models.qwen import build_gpt_model
    from megatron_lpreg.parallel import collectives as coll
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    parallel_cfg = ParallelConfig()
    ctx = init_parallel(parallel_cfg, seed=0)
    try:
        model = build_gpt_model(model_cfg, parallel_cfg, initialize=False)
        if model_cfg.params_dtype == "bfloat16":
            model.bfloat16()
        model.eval()
        load_hf_weights([model], hf_dir, model_cfg, ctx)
        if not attention_takes_packed_seq_params(model):
            return {"error": "the model's core attention does not read PackedSeqParams (not the TE spec)"}
        g = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(0, model_cfg.vocab_size, (n,), generator=g) for n in lengths]
        longest = max(lengths)
        padded = torch.zeros(len(seqs), longest, dtype=torch.long)
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
        packed = torch.cat(seqs).unsqueeze(0)
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        with torch.no_grad():
            pad_logits = model(coll.on_device(padded, ctx), coll.arange(longest, ctx).expand(len(seqs), longest), None)
            thd_logits = model(coll.on_device(packed, ctx), coll.on_device(positions, ctx), None,
                               packed_seq_params=thd_packed_seq_params(lengths, ctx.device))
        pad_logp, thd_logp = _logprobs(pad_logits, model_cfg.vocab_size), _logprobs(thd_logits, model_cfg.vocab_size)
        logit_diff = logp_diff = 0.0
        start = 0
        for i, n in enumerate(lengths):
            row = slice(start, start + n)
            logit_diff = max(logit_diff, float((pad_logits[i, :n].double() - thd_logits[0, row].double()).abs().max()))
            logp_diff = max(logp_diff, float((pad_logp[i, :n] - thd_logp[0, row]).abs().max()))
            start += n
        return {"max_abs_logit_diff": logit_diff, "max_abs_logprob_diff": logp_diff, "lengths": list(lengths)}
    finally:
        destroy_parallel(destroy_process_group=False)


def packed_thd_parity(hf_dir: Path, dtype: str, *, impl: str = "transformer_engine",
                      timeout_s: float = 600.0) -> dict[str, Any]:
    """Max |difference| of logits and log-probs, packed THD row vs padded rows, for the model in ``hf_dir``.

    Args:
        hf_dir: an HF Qwen directory (the tiny models of ``model_parity``).
        dtype: ``float32`` or ``bfloat16`` parameters.
        impl: ``model.transformer_impl``; ``transformer_engine`` on the GPU (CPU tests swap in a stand-in spec).

    Returns:
        ``max_abs_logit_diff``, ``max_abs_logprob_diff``, ``lengths`` and the ``tolerance`` (that of
        ``model_parity``); or ``error`` when the model cannot take packed sequences.
    """
    from megatron_lpreg.models.convert import run_job
    from megatron_lpreg.models.parity import DEFAULT_TOLERANCE
    from megatron_lpreg.models.qwen import model_config_from_hf

    model_cfg = dataclasses.replace(model_config_from_hf(hf_dir), params_dtype=dtype, transformer_impl=impl)
    result = run_job(_rank_thd_vs_padded, 1, model_cfg, str(hf_dir), LENGTHS, 0, timeout_s=timeout_s)[0]
    return {**result, "tolerance": DEFAULT_TOLERANCE[dtype]}
