"""The root config: one typed tree, strict YAML round trip, dotted overrides, cross-field validation."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.config.base import (
    ConfigError,
    deep_merge,
    dump_yaml,
    from_dict,
    parse_override,
    set_dotted,
    to_dict,
)
from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.config.diagnostics import DiagnosticsConfig
from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.config.trainer import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainerConfig


@dataclass(kw_only=True)
class RunConfig:
    """Everything one run needs. Components receive their own sub-config, never this root."""

    seed: int = 1234
    """Root seed; every other seed derives from it and (step, rank)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Exploration diagnostics: spark / noise token classes -> ``diag/*`` metrics every step (docs/diagnostics.md);
    empty (the default) = none and no cost."""

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, text: str) -> RunConfig:
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
        """Load ``path`` (following its ``base:`` chain), apply dotted ``overrides``, validate."""
        data = load_yaml_tree(Path(path))
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(data, key, value)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Cross-field checks; raise ConfigError naming the fields, values and a fix."""
        self.model.validate(self.parallel)
        if self.parallel.sequence_parallel and self.model.transformer_impl == "local":
            raise ConfigError("parallel.sequence_parallel=true needs model.transformer_impl=transformer_engine")
        for section in (self.algo, self.rollout, self.trainer, self.data, self.reward, self.eval, self.checkpoint):
            section.validate()
        self.diagnostics.validate(vocab_size=self.model.vocab_size)
        self.validate_world_layout()

    def validate_world_layout(self) -> None:
        """``trainer.world_size`` must be ``parallel.tp x parallel.pp x dp`` (``parallel.dp``, or derived when 0),
        checked at load time so that a wrong layout fails before submission, not at bootstrap.

        Raises:
            ConfigError: naming trainer.world_size and the parallel keys, with the values that would fit.
        """
        world, tp, pp, dp = self.trainer.world_size, self.parallel.tp, self.parallel.pp, self.parallel.dp
        if world < 1:
            raise ConfigError(f"trainer.world_size={world} must be >= 1")
        model_parallel = tp * pp
        if dp and world != model_parallel * dp:
            raise ConfigError(
                f"trainer.world_size={world} != parallel.tp={tp} x parallel.pp={pp} x parallel.dp={dp} = "
                f"{model_parallel * dp}; set trainer.world_size={model_parallel * dp}"
                + (f" or parallel.dp={world // model_parallel}" if world % model_parallel == 0 else "")
                + " (or parallel.dp=0 to derive it)")
        if world % model_parallel:
            raise ConfigError(
                f"trainer.world_size={world} is not a multiple of parallel.tp={tp} x parallel.pp={pp} = "
                f"{model_parallel}; use trainer.world_size={max(1, world // model_parallel) * model_parallel}")


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``base:`` (a path or list of paths, relative to the file) is merged underneath."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)
