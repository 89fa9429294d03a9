"""Fixtures for rollout tests: a tiny random Qwen2 checkpoint in HF format (no tokenizer, vocab 1000 so that a
Megatron model pads it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.tiny import tiny_qwen3, tiny_vllm_qwen2  # noqa: F401  (fixtures of test_vllm.py)

TINY_VOCAB = 1000


def make_hf_qwen2(out_dir: Path, *, seed: int, vocab_size: int = TINY_VOCAB) -> Path:
    """Save a random 2-layer Qwen2 (hidden 64, GQA 4/2 heads, qkv bias) to ``out_dir`` and return it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init so that sampling is not near-uniform
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return make_hf_qwen2(tmp_path_factory.mktemp("tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_b(tmp_path_factory) -> Path:
    """Same architecture, different weights (a "trained" version of tiny_hf_dir)."""
    return make_hf_qwen2(tmp_path_factory.mktemp("tiny_hf_b"), seed=1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """models.tiny checkpoints (with tokenizer) for both families: qwen2 untied + QKV bias, qwen3 tied + QK norm."""
    from megatron_lpreg.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("mcore_tiny")
    return {
        arch: make_tiny_model(root / arch, arch, seed=3, max_position_embeddings=256) for arch in ("qwen2", "qwen3")
    }
