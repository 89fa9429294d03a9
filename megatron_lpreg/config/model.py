"""Model architecture and parallelism configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Qwen2/Qwen2.5/Qwen3 decoder. Filled from an HF ``config.json`` when ``hf_path`` is set."""

    hf_path: str = ""
    """Hugging Face model directory (config.json, safetensors, tokenizer). Empty: use the fields below."""
    mcore_path: str = ""
    """Megatron dist checkpoint to load weights from (made by tools/convert_hf_to_mcore.py). Empty: use hf_path."""
    arch: Literal["qwen2", "qwen3"] = "qwen2"
    """Model family: qwen2 (Qwen2/Qwen2.5: QKV bias) or qwen3 (q/k RMSNorm, no QKV bias)."""
    vocab_size: int = 1024
    """Tokenizer/embedding vocabulary before Megatron padding."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    head_dim: int = 16
    """Per-head size (Qwen3 decouples it from hidden/heads)."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is set up for (tokens)."""
    rope_theta: float = 1000000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocab to a multiple of this times TP; padded logits are masked downstream."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter/compute dtype (optimizer keeps fp32 master weights for bf16/fp16)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: auto = Transformer Engine on GPU when installed, local otherwise (always local on CPU)."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Process layout. world = tp * pp * dp; dp is derived from the world size when 0."""

    tp: int = 1
    """Tensor-parallel size (must divide attention heads and KV groups)."""
    pp: int = 1
    """Pipeline-parallel size (must not exceed num_layers)."""
    vpp: int = 1
    """Virtual pipeline stages per PP rank (interleaved 1F1B when > 1)."""
    dp: int = 0
    """Data-parallel size; 0 = world_size / (tp * pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (Transformer Engine spec only)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over DP ranks (megatron distributed optimizer)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""
