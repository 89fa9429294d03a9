"""Typed config tree: ``RunConfig.load(path, overrides)``; see docs/config.md."""
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.config.diagnostics import DiagnosticsConfig, TokenClasses
from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.config.run import RunConfig
from megatron_lpreg.config.trainer import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainerConfig

__all__ = [
    "AlgoConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DiagnosticsConfig", "EvalConfig", "LoggingConfig",
    "ModelConfig", "OptimizerConfig", "ParallelConfig", "RewardConfig", "RolloutConfig", "RunConfig", "TokenClasses",
    "TrainerConfig",
]
