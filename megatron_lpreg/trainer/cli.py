"""``megatron-lpreg train CONFIG.yaml [dotted.overrides ...]``."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import sys
from pathlib import Path

from megatron_lpreg import rundir, telemetry
from megatron_lpreg.config import ConfigError, ModelConfig, RunConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. algo.rho=0.01 trainer.max_steps=4 trainer.output_dir=runs/x")
    parser.epilog = ("Writes <trainer.output_dir>/config.yaml, metrics.jsonl (one line per step), eval.jsonl, "
                     "checkpoints/ and logs/. trainer.resume=auto continues from the latest checkpoint. "
                     "Exit code 42 means 'checkpointed on a preemption signal, requeue me'.")


def resolve_config(path: str, overrides: list[str]) -> RunConfig:
    """Load the YAML + overrides; when model.hf_path is set, the architecture comes from its config.json."""
    cfg = RunConfig.load(path, overrides)
    if cfg.model.hf_path.startswith(TINY_PREFIX):
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, hf_path=str(materialize_tiny(cfg.model))))
    if cfg.model.hf_path:
        from megatron_lpreg.models.qwen import resolve_model_config

        cfg = cfg.replace(model=resolve_model_config(cfg.model))  # the checkpoint's config.json wins
        cfg.validate()
    return cfg


TINY_PREFIX = "tiny:"


def materialize_tiny(model: ModelConfig) -> Path:
    """``model.hf_path: tiny:<seed>`` = a tiny random HF checkpoint with this config's shape, made offline once
    and cached under $MEGATRON_LPREG_CACHE (default ~/.cache/megatron_lpreg)."""
    from megatron_lpreg.models.tiny import make_tiny_model

    seed_text = model.hf_path[len(TINY_PREFIX):] or "0"
    if not seed_text.isdigit():
        raise ConfigError(f"model.hf_path={model.hf_path!r}: expected 'tiny:<seed>' (e.g. tiny:0)")
    shape = (model.arch, model.vocab_size, model.hidden_size, model.ffn_hidden_size, model.num_layers,
             model.num_attention_heads, model.num_query_groups, model.head_dim, model.tie_word_embeddings,
             model.max_position_embeddings, model.rope_theta, model.rms_norm_eps, int(seed_text))
    key = hashlib.sha1(repr(shape).encode()).hexdigest()[:12]
    root = Path(os.environ.get("MEGATRON_LPREG_CACHE", Path.home() / ".cache" / "megatron_lpreg"))
    out = root / "tiny" / f"{model.arch}-{key}"
    if not (out / "config.json").exists():
        root.joinpath("tiny").mkdir(parents=True, exist_ok=True)
        try:
            make_tiny_model(out, model.arch, seed=int(seed_text), vocab_size=model.vocab_size,
                            num_layers=model.num_layers, hidden_size=model.hidden_size,
                            num_attention_heads=model.num_attention_heads, num_kv_heads=model.num_query_groups,
                            head_dim=model.head_dim, ffn_hidden_size=model.ffn_hidden_size,
                            max_position_embeddings=model.max_position_embeddings, rope_theta=model.rope_theta,
                            rms_norm_eps=model.rms_norm_eps, tie_word_embeddings=model.tie_word_embeddings)
        except FileExistsError:
            pass  # another process made it first (the write is atomic)
    return out


def run(args: argparse.Namespace) -> int:
    telemetry.setup(0, 1)
    _prepare_fork_helper()
    try:
        cfg = resolve_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.trainer.output_dir)
    try:
        _check_compatible_run_dir(run_dir, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / rundir.CONFIG_FILE)
    from megatron_lpreg.parallel.spawn import RankFailure
    from megatron_lpreg.trainer.launch import launch
    from megatron_lpreg.trainer.signals import forward_signals_to_run_dir

    try:
        # Ranks live in other processes (forked or Ray actors): a SIGUSR1/SIGTERM sent to this launcher becomes
        # the run dir's preemption flag, which the ranks poll every step.
        with forward_signals_to_run_dir(run_dir):
            code = launch(cfg, str(run_dir))
    except RankFailure as exc:
        logger.error("training failed:\n%s", exc)
        print(f"error: training failed: {_first_error_line(str(exc))} (full traceback in {run_dir}/logs and above)",
              file=sys.stderr)
        return 1
    logger.info("training finished with exit code %d; run dir %s", code, run_dir)
    return code


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("rank "):
            return line
    return text.splitlines()[0] if text else "unknown error"


def _prepare_fork_helper() -> None:
    """Import megatron once and start the clean fork helper before this process computes anything (see
    megatron_lpreg.parallel.spawn: ranks forked from a process that used OpenMP threads hang)."""
    import megatron.core.models.gpt  # noqa: F401  (pre-import: forked ranks start warm)
    import megatron.core.optimizer  # noqa: F401

    from megatron_lpreg.parallel.spawn import start_zygote

    start_zygote()


def _check_compatible_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a fresh start over existing checkpoints, and resuming a run directory of a different model."""
    from megatron_lpreg.trainer.state import refuse_fresh_start_over_checkpoints

    try:
        refuse_fresh_start_over_checkpoints(run_dir, cfg.trainer.resume)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    old = run_dir / rundir.CONFIG_FILE
    if not old.exists() or cfg.trainer.resume == "never":
        return
    previous = RunConfig.from_yaml(old.read_text())
    arch_keys = ("arch", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                 "num_query_groups", "head_dim", "tie_word_embeddings")
    diff = [f"model.{k}: {getattr(previous.model, k)} -> {getattr(cfg.model, k)}" for k in arch_keys
            if getattr(previous.model, k) != getattr(cfg.model, k)]
    if diff and rundir.checkpoints_root(run_dir).exists():
        raise ConfigError(f"{run_dir} holds checkpoints of a different model; refusing to resume "
                          f"({'; '.join(diff)}). Use a new trainer.output_dir.")
