"""Trainer, optimizer, checkpoint and logging configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_lpreg.config.base import ConfigError


@dataclass(kw_only=True)
class OptimizerConfig:
    """Megatron optimizer settings (the authors: Adam lr 1e-6 constant, wd 0, clip 1.0)."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor for decaying schedules."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """LR schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip (0 = off)."""


@dataclass(kw_only=True)
class TrainerConfig:
    """The RL loop."""

    max_steps: int = 10
    """RL steps (one rollout batch each)."""
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, logs/."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from output_dir's latest checkpoint if any; must: fail without one; never: start from step 0
    (refused when output_dir already holds checkpoints, which the new run would overwrite)."""
    launcher: Literal["local", "ray"] = "local"
    """local: ranks forked in-process on this machine; ray: trainer ranks as Ray actors."""
    world_size: int = 1
    """Trainer ranks (local launcher)."""
    updates_per_step: int = 1
    """Optimizer updates per rollout batch (1 = on-policy; >1 splits into mini-batches: off-policy)."""
    micro_batch_tokens: int = 30720
    """Token budget of one micro-batch per rank (prompt + response)."""
    packing: bool = False
    """Packed, token-balanced micro-batches (verl's dynamic batch size): sequences concatenated without padding
    into micro-batches of at most micro_batch_tokens, assigned by balanced partitioning, so Lp-Reg's
    selection=reference pools the authors' tokens. Local spec: a block-diagonal causal mask and per-sequence RoPE
    positions; Transformer Engine spec: megatron's THD layout (PackedSeqParams, TE >= 1.7). false = padded
    micro-batches of consecutive sequences."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """What to do on a non-finite loss or grad norm."""
    max_consecutive_nan: int = 3
    """Stop with an error after this many skipped steps in a row."""
    walltime_margin_s: float = 300.0
    """Under a time limit (``SLURM_JOB_END_TIME``, or asked from Slurm once): after each step the trainer checkpoints
    and exits with the requeue code (42) when the next step, a save and this many seconds would not fit before the
    job's end; the margin covers shutdown (engines, Ray, process exit) and estimate error. See docs/slurm.md."""

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ConfigError(f"trainer.max_steps={self.max_steps} must be >= 0")
        if self.updates_per_step < 1:
            raise ConfigError(f"trainer.updates_per_step={self.updates_per_step} must be >= 1")
        if self.micro_batch_tokens < 1:
            raise ConfigError(f"trainer.micro_batch_tokens={self.micro_batch_tokens} must be >= 1")
        if self.walltime_margin_s < 0:
            raise ConfigError(f"trainer.walltime_margin_s={self.walltime_margin_s} must be >= 0 (seconds)")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpointing."""

    interval: int = 0
    """Save every N steps (0 = only at the end and on preemption signals)."""
    keep_last: int = 2
    """Keep the newest N checkpoints."""
    keep_every: int = 0
    """Also keep, for good, every checkpoint whose step is a multiple of this (0 = none), e.g. for
    ``eval-array --checkpoints all``; the disk budget is in docs/slurm.md and ``megatron-lpreg plan`` prints the
    bytes of one checkpoint."""
    save_optimizer: bool = True
    """Include optimizer and LR-schedule state (needed for exact resume)."""
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """How the distributed optimizer's state is written. fully_reshardable: every DP rank gathers its TP/PP
    shard's whole fp32 parameter and Adam buffers (~21 GB of host RAM per rank for 14B at TP8) and the checkpoint
    resumes at any layout. dp_reshardable: each rank writes its own shard, nothing is gathered (host RAM of save
    and load in docs/benchmarks.md); resuming at another TP/PP/VPP is refused (DP may change). The loader reads
    the format from the checkpoint, so either loads under either setting."""

    def validate(self) -> None:
        """Counts are non-negative; kept steps are steps that are saved.

        Raises:
            ConfigError: naming the key, its value and a fix.
        """
        for name in ("interval", "keep_last", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name}={getattr(self, name)} must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1 (the newest checkpoint is the "
                              f"one a requeued run resumes from)")
        if self.keep_every and self.interval and self.keep_every % self.interval:
            raise ConfigError(
                f"checkpoint.keep_every={self.keep_every} is not a multiple of checkpoint.interval={self.interval}: "
                f"only steps that are multiples of both are saved; use checkpoint.keep_every="
                f"{-(-self.keep_every // self.interval) * self.interval}")


@dataclass(kw_only=True)
class LoggingConfig:
    """Logs and metric sinks."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    all_ranks: bool = False
    """Log INFO from every rank (default: rank 0 only)."""
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "megatron_lpreg"
    progress: bool = True
    """tqdm progress bars on rank 0 when stdout is a TTY."""
    diversity_interval: int = 10
    """Compute self-BLEU across each prompt's responses every N steps (0 = never; it costs CPU time)."""
    lowprob_threshold: float = 0.1
    """Sampled tokens with engine probability below this count as low-probability (``lowprob/*`` metrics)."""
