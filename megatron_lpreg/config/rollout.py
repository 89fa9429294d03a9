"""Rollout, reward, data and evaluation configs."""
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


@dataclass(kw_only=True)
class RewardConfig:
    """How responses are scored."""

    name: str = "math"
    """Reward function: math (last \\boxed{} + math-verify), exact_match, or a python path 'pkg.module:fn'."""
    timeout_s: float = 5.0
    """Per-sample deadline; a response that takes longer scores 0 with reason 'timeout'."""
    num_workers: int = 2
    """Reward worker processes."""


@dataclass(kw_only=True)
class DataConfig:
    """Prompt dataset."""

    source: str = "synthetic:addition"
    """'synthetic:addition' (built-in verifiable task) or a path to .parquet/.jsonl (verl layout or problem/answer)."""
    template: Literal["qwen_chat", "zero", "plain"] = "plain"
    """Prompt template: Qwen2.5 chat, the 'zero' <think> template, or the raw problem text."""
    max_prompt_tokens: int = 2048
    """Longer prompts are dropped (counted in the log)."""
    shuffle: bool = True
    """Shuffle each epoch with a seed derived from the run seed."""
    heldout_size: int = 200
    """Synthetic task: held-out problems excluded from training."""


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation during/after training."""

    benchmarks: list[str] = field(default_factory=list)
    """Benchmarks to run (aime24, aime25, math500, minerva, olympiadbench, synthetic)."""
    data_dir: str = ""
    """Directory with the benchmark files (see docs/eval.md)."""
    interval: int = 0
    """Evaluate every N steps (0 = never during training)."""
    samples: int = 16
    """avg@k for sampled benchmarks (AIME)."""
    temperature: float = 0.6
    """Sampling temperature for sampled benchmarks."""
    max_new_tokens: int = 64
    """Longest response during evaluation."""
