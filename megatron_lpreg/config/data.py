"""Reward, data and evaluation configs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_lpreg.config.base import ConfigError


@dataclass(kw_only=True)
class RewardConfig:
    """How responses are scored."""

    name: str = "math"
    """Reward function: math (last \\boxed{} + math-verify), exact_match, or a python path 'pkg.module:fn'."""
    timeout_s: float = 5.0
    """Per-sample deadline; a response that takes longer scores 0 with reason 'timeout'."""
    num_workers: int = 2
    """Reward worker processes."""
    memory_limit_mb: int = 4096
    """Address-space limit per reward worker in MiB (0 = none); a sample that exceeds it scores 0 (reason error)."""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"reward.timeout_s={self.timeout_s} must be > 0 seconds")
        if self.num_workers < 1:
            raise ConfigError(f"reward.num_workers={self.num_workers} must be >= 1")
        if self.memory_limit_mb < 0:
            raise ConfigError(f"reward.memory_limit_mb={self.memory_limit_mb} must be >= 0 (0 = no limit)")


@dataclass(kw_only=True)
class DataConfig:
    """Prompt dataset."""

    source: str = "synthetic:addition"
    """'synthetic:addition' (built-in verifiable task) or a path to .parquet/.jsonl/.json (verl layout or
    problem/answer columns; see docs/eval.md)."""
    template: Literal["qwen_chat", "lpreg_zero", "zero", "plain"] = "plain"
    """Prompt template: Qwen2.5 chat; 'lpreg_zero', the Lp-Reg authors' plain-text <think> prompt verbatim (the
    paper configs); 'zero', this project's older <think> prompt (other wording, asks for \\boxed{}); or the raw
    problem text. See megatron_lpreg/data/templates.py and ``megatron-lpreg prompt``."""
    instruction: str = ""
    """qwen_chat only: appended to plain {problem, answer} problems (e.g. 'Please reason step by step, and put
    your final answer within \\boxed{}.'); verl-layout prompts are used as they are."""
    problem_key: str = ""
    """Column holding the problem ('' = detect: verl 'prompt', else problem | question)."""
    answer_key: str = ""
    """Column holding the answer ('' = detect: verl reward_model.ground_truth, else answer | final_answer |
    ground_truth)."""
    max_prompt_tokens: int = 2048
    """Longer prompts are dropped (counted in the log)."""
    shuffle: bool = True
    """Shuffle each epoch with a seed derived from the run seed."""
    heldout_size: int = 400
    """Synthetic task: held-out problems excluded from training (evaluation)."""
    dev_size: int = 200
    """Synthetic task: a second excluded split (e.g. to stop a supervised warm start)."""
    data_seed: int = 0
    """Synthetic task: seed of the held-out/dev split, independent of the run seed so it stays fixed."""

    def validate(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"data.max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        if self.heldout_size < 0 or self.dev_size < 0:
            raise ConfigError(f"data.heldout_size={self.heldout_size} and data.dev_size={self.dev_size} must be >= 0")
        if not self.source:
            raise ConfigError("data.source is empty; use 'synthetic:addition' or a .parquet/.jsonl path")


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation during/after training (docs/eval.md)."""

    benchmarks: list[str] = field(default_factory=list)
    """Benchmarks to run: aime24, aime25 (sampled, avg@k), math500, minerva, olympiadbench (greedy), synthetic
    (the data's held-out problems, greedy), or name=path for any problem file."""
    data_dir: str = ""
    """Directory with the benchmark files (see docs/eval.md)."""
    interval: int = 0
    """Evaluate every N steps during training (0 = never; the Lp-Reg authors: 8)."""
    before_training: bool = True
    """Also evaluate at step 0, before the first update (the authors: false, no validation before training). The
    last step is always evaluated when interval > 0."""
    samples: int = 16
    """avg@k for sampled benchmarks (AIME) in ``megatron-lpreg eval`` / ``eval-array`` (the paper reports avg@16),
    and during training unless ``training_samples`` is set."""
    training_samples: int = 0
    """avg@k for sampled benchmarks in the evaluations during training (0 = ``samples``); the authors validate with
    1 (AIME at temperature 0.6, n=1; the other benchmarks greedy)."""
    engine_tp: int = 0
    """Tensor parallelism of each engine of ``megatron-lpreg eval`` and of every eval-array task (sglang/vllm;
    0 = rollout.engine_tp). An eval task runs on one node, with its own layout, not the training run's."""
    num_engines: int = 0
    """Engines of one eval task, all on its node, engine k on GPUs k*engine_tp .. (sglang; vllm runs 1). 0 = as
    many as the node holds (visible GPUs // engine_tp). ``megatron-lpreg plan`` prints and checks this layout."""
    temperature: float = 0.6
    """Sampling temperature for sampled benchmarks."""
    top_p: float = 1.0
    """Nucleus threshold for sampled benchmarks."""
    max_new_tokens: int = 64
    """Longest response during evaluation."""
    template: Literal["data", "qwen_chat", "lpreg_zero", "zero", "plain"] = "data"
    """Prompt template for benchmark problems; 'data' = the training template (data.template)."""
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """qwen_chat only: appended to each benchmark problem ('' = none)."""
    batch_size: int = 64
    """Prompts per engine call."""

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"eval.samples={self.samples} must be >= 1")
        zero_means = {"interval": "no evaluation during training", "training_samples": "eval.samples",
                      "engine_tp": "rollout.engine_tp", "num_engines": "fill the node"}
        for name, meaning in zero_means.items():
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 0 (0 = {meaning})")
        if self.temperature <= 0:
            raise ConfigError(f"eval.temperature={self.temperature} must be > 0 (greedy benchmarks ignore it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"eval.max_new_tokens={self.max_new_tokens} and eval.batch_size={self.batch_size} "
                              "must be >= 1")
