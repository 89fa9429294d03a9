"""Tiny offline Qwen checkpoints for tests, built once per session and per distinct set of arguments.

Use the fixtures (``tiny_qwen2``, ``tiny_qwen3``: default shapes, vocab 1000 = not a multiple of 128, GQA with
2 KV heads; qwen3 tied with head_dim 32 != hidden/heads; ``tiny_vllm_qwen2``: head_dim 32 for vLLM) by naming
them as test arguments (tests/conftest.py registers this module as a plugin; do not import them), or call
:func:`tiny_model_dir` for other shapes. Directories are read-only by convention:
copy before modifying.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from megatron_lpreg.models.tiny import make_tiny_model

_ROOT: Path | None = None
_CACHE: dict[str, Path] = {}


def tiny_model_dir(arch: str = "qwen2", **kwargs: Any) -> Path:
    """Path of a tiny HF model made with ``make_tiny_model(arch=arch, **kwargs)``, cached for the process."""
    global _ROOT
    key = json.dumps({"arch": arch, **kwargs}, sort_keys=True)
    if key not in _CACHE:
        if _ROOT is None:
            _ROOT = Path(tempfile.mkdtemp(prefix="lpreg-tiny-"))
        _CACHE[key] = make_tiny_model(_ROOT / f"m{len(_CACHE)}-{arch}", arch, **kwargs)
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    """Default tiny Qwen2 (untied, QKV bias, vocab 1000, 2 layers, hidden 64, 4 heads / 2 KV heads)."""
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3() -> Path:
    """Default tiny Qwen3 (tied, q/k norm, head_dim 32, vocab 1000, 2 layers, hidden 64, 4 heads / 2 KV heads)."""
    return tiny_model_dir("qwen3")


VLLM_MIN_HEAD_DIM = 32
"""vLLM's CPU attention refuses head_dim 16 (the default tiny Qwen2's); 32, 64, 80, ... 512 are accepted."""


@pytest.fixture(scope="session")
def tiny_vllm_qwen2() -> Path:
    """Tiny Qwen2 that vLLM's CPU attention accepts: head_dim 32 (hidden 64, 2 heads, 1 KV head), untied, QKV
    bias, vocab 1000, 256 positions, fp32."""
    return tiny_model_dir("qwen2", seed=3, num_attention_heads=2, num_kv_heads=1, max_position_embeddings=256)
