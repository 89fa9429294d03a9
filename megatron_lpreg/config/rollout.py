"""Rollout-engine config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_lpreg.config.base import ConfigError


@dataclass(kw_only=True)
class RolloutConfig:
    """How responses are generated."""

    engine: Literal["local", "sglang", "vllm"] = "local"
    """local = in-process engine on the trainer's own parameters (CPU default); sglang/vllm on GPU clusters."""
    n: int = 8
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    min_p: float = 0.0
    """Min-p sampling (0 = off)."""
    max_new_tokens: int = 64
    """Longest response (tokens)."""
    prompts_per_step: int = 16
    """Prompts sampled per RL step."""
    sglang_urls: list[str] = field(default_factory=list)
    """Attach to running SGLang servers (http://host:port); empty = launch them."""
    sglang_launch_args: list[str] = field(default_factory=list)
    """Extra `python -m sglang.launch_server` arguments when launching."""
    engine_tp: int = 1
    """Tensor parallelism inside each SGLang/vLLM engine."""
    num_engines: int = 1
    """Rollout engines (data parallel)."""
    weight_sync: Literal["auto", "disk", "tensor", "distributed"] = "auto"
    """How engines receive new weights (auto: no copy for local, distributed for sglang)."""
    request_timeout_s: float = 600.0
    """HTTP timeout for one generate call."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"rollout.n={self.n} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be > 0 (use top_k=1 for greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
