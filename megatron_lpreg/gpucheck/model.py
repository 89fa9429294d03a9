"""GPU-check section ``model_parity``: transformers vs our megatron model on a tiny offline Qwen, one rank.

For a tiny random Qwen2 (QKV bias) and Qwen3 (QK-norm) made by :mod:`megatron_lpreg.models.tiny`, the HF model's
logits (the reference, computed on the CPU) are compared with the megatron model's (on the checked device) at
TP=PP=1 in fp32 and bf16, with the local layer spec and, when ``transformer_engine`` imports on a CUDA machine,
the Transformer Engine spec; with TE also the packed THD layout against the padded one (``trainer.packing``,
:mod:`megatron_lpreg.gpucheck.packing`); on each spec the local rollout engine on uneven prompt lengths, batched
against each prompt alone (:mod:`megatron_lpreg.gpucheck.engine_padding`). Tolerances are
:data:`megatron_lpreg.models.parity.DEFAULT_TOLERANCE`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.gpucheck.ops import CheckFailed

logger = logging.getLogger(__name__)

ARCHS = ("qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")


def te_unavailable_reason(device: torch.device) -> str | None:
    """Why the Transformer Engine spec cannot be checked here, or None when it can."""
    if device.type != "cuda":
        return "the Transformer Engine spec needs CUDA"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not importable (pip install '.[te]' on the GPU node to check it)"
    return None


def _one(hf_dir: Path, arch: str, impl: str, dtype: str) -> dict[str, float]:
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.models.parity import (
        DEFAULT_TOLERANCE,
        compare_logits,
        hf_logits,
        megatron_logits,
        parity_tokens,
    )
    from megatron_lpreg.models.qwen import model_config_from_hf

    model_cfg = dataclasses.replace(model_config_from_hf(hf_dir), params_dtype=dtype, transformer_impl=impl)
    tokens = parity_tokens(model_cfg.vocab_size, batch=2, seq_len=16, seed=0)
    reference = hf_logits(hf_dir, tokens, dtype)
    ours = megatron_logits(model_cfg, ParallelConfig(tp=1, pp=1), tokens, hf_dir=hf_dir)
    logit_diff, logp_diff = compare_logits(reference.float(), ours.float().cpu())
    return {"max_abs_logit_diff": logit_diff, "max_abs_logprob_diff": logp_diff,
            "tolerance": DEFAULT_TOLERANCE[dtype]}


def _packed_thd(hf_dir: Path, arch: str, te_reason: str | None, numbers: dict[str, Any]) -> list[str]:
    """THD-packed vs padded log-probs on the TE spec (into ``numbers``); the failures found."""
    from megatron_lpreg.gpucheck.packing import packed_thd_parity

    if te_reason is not None:
        numbers["packed_thd"] = f"skipped: {te_reason}"
        return []
    failures = []
    for dtype in DTYPES:
        key = f"{arch}_packed_thd_{dtype}"
        try:
            result = numbers[key] = packed_thd_parity(hf_dir, dtype)
        except Exception as exc:  # noqa: BLE001 (a TE refusal of THD input in this dtype is the finding)
            numbers[key] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        logger.info("model_parity %s: %s", key, result)
        if "error" in result or result["max_abs_logprob_diff"] > result["tolerance"]:
            failures.append(f"{key}: {result}")
    return failures


def _engine_padding(hf_dir: Path, arch: str, impl: str, numbers: dict[str, Any]) -> list[str]:
    """The local engine on uneven prompt lengths, batched vs alone (into ``numbers``); the failures found."""
    from megatron_lpreg.gpucheck.engine_padding import padded_batch_parity

    key = f"{arch}_{impl}_engine_uneven_prompts"
    result = numbers[key] = padded_batch_parity(hf_dir, impl)
    logger.info("model_parity %s: %s", key, result)
    if not result["same_tokens"] or result["max_abs_logprob_diff"] > result["tolerance"]:
        return [f"{key}: a left-padded batch differs from each prompt alone: {result}"]
    return []


def model_parity(device: torch.device, work_dir: Path) -> dict[str, Any]:
    """Section ``model_parity``; raises CheckFailed (with every measured difference) when one exceeds tolerance."""
    from megatron_lpreg.models.tiny import make_tiny_model

    impls = ["local"]
    te_reason = te_unavailable_reason(device)
    if te_reason is None:
        impls.append("transformer_engine")
    numbers: dict[str, Any] = {"te_spec": "checked" if te_reason is None else f"skipped: {te_reason}"}
    failures = []
    for arch in ARCHS:
        hf_dir = work_dir / f"tiny-{arch}"
        if not (hf_dir / "config.json").exists():
            make_tiny_model(hf_dir, arch, seed=0, hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                            ffn_hidden_size=256)
        for impl in impls:
            failures += _engine_padding(hf_dir, arch, impl, numbers)
            for dtype in DTYPES:
                key = f"{arch}_{impl}_{dtype}"
                result = numbers[key] = _one(hf_dir, arch, impl, dtype)
                logger.info("model_parity %s: %s", key, result)
                if max(result["max_abs_logit_diff"], result["max_abs_logprob_diff"]) > result["tolerance"]:
                    failures.append(f"{key}: logits differ by {result['max_abs_logit_diff']:.3g} "
                                    f"> {result['tolerance']:g}")
        failures += _packed_thd(hf_dir, arch, te_reason, numbers)
    if failures:
        raise CheckFailed("; ".join(failures), numbers)
    return numbers
