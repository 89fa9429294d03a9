"""``megatron-lpreg eval (--model HF_DIR | --checkpoint CKPT) --benchmarks aime24,math500 [key=value ...]``.

The engine comes from ``rollout.*`` (local on CPU, sglang/vllm on GPUs) through
:func:`megatron_lpreg.rollout.factory.build_engine`, laid out on this one node by ``eval.engine_tp`` and
``eval.num_engines`` (:mod:`megatron_lpreg.eval.layout`), not by the training run's engine count. A training
checkpoint (a dist checkpoint directory, or ``RUN_DIR@latest``) is exported to Hugging Face format once, into
``<checkpoint>/hf_export`` (:mod:`megatron_lpreg.eval.hf_cache`), and reused by every later evaluation of it; the
run's config.yaml next to it supplies the data/template settings unless ``--config`` is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.config.base import from_dict, parse_override, set_dotted, to_dict
from megatron_lpreg.eval.hf_cache import cached_hf_export, is_hf_dir
from megatron_lpreg.eval.layout import eval_rollout_config, plan_eval_layout, visible_gpus
from megatron_lpreg.rundir import CONFIG_FILE, resolve_checkpoint

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    source.add_argument("--checkpoint", help="training checkpoint directory, or RUN_DIR@latest")
    parser.add_argument("--benchmarks", required=True,
                        help="comma-separated: aime24,aime25,math500,minerva,olympiadbench,synthetic or name=path")
    parser.add_argument("--data-dir", default=None, help="directory with the benchmark files (eval.data_dir)")
    parser.add_argument("--out", default="eval_out", help="output directory (results.json, results.md, generations/)")
    parser.add_argument("--samples", type=int, default=None, help="avg@k for sampled benchmarks (eval.samples)")
    parser.add_argument("--config", default=None, help="run config YAML (default: the checkpoint's run config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. eval.max_new_tokens=8192 rollout.engine=sglang eval.template=zero")


def load_eval_config(config_path: str | None, overrides: list[str], checkpoint: Path | None) -> RunConfig:
    """The run config for an evaluation: ``--config``, else the checkpoint's run config.yaml, else defaults;
    then the dotted overrides (strictly checked)."""
    path = Path(config_path) if config_path else None
    if path is None and checkpoint is not None:
        candidate = checkpoint.parent.parent / CONFIG_FILE  # <run>/checkpoints/step_N -> <run>/config.yaml
        path = candidate if candidate.is_file() else None
    if path is not None:
        logger.info("run config: %s", path)
        return RunConfig.load(path, overrides)
    data = to_dict(RunConfig())
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def export_checkpoint(checkpoint: Path, out_dir: Path, hf_config_dir: str) -> Path:
    """An HF directory for ``checkpoint``: itself if it already is one, else its cached export
    (``<checkpoint>/hf_export``, written once; under ``out_dir`` only when the checkpoint is not writable)."""
    if is_hf_dir(checkpoint):
        return checkpoint
    assets = hf_config_dir if hf_config_dir and is_hf_dir(Path(hf_config_dir)) else None
    return cached_hf_export(checkpoint, assets, fallback_dir=out_dir)[0]


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from megatron_lpreg import telemetry
    from megatron_lpreg.eval.runner import evaluate
    from megatron_lpreg.rollout.factory import build_engine

    telemetry.setup(0, 1)
    out = Path(args.out)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        cfg = load_eval_config(args.config, list(args.overrides), checkpoint)
        changes = {"benchmarks": [args.benchmarks]}
        if args.data_dir is not None:
            changes["data_dir"] = args.data_dir
        if args.samples is not None:
            changes["samples"] = args.samples
        eval_cfg = dataclasses.replace(cfg.eval, **changes)
        eval_cfg.validate()
        layout = plan_eval_layout(eval_cfg, cfg.rollout, 0 if cfg.rollout.engine == "local" else visible_gpus())
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-lpreg eval: {exc}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else export_checkpoint(checkpoint, out, cfg.model.hf_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logger.info("%s (CUDA_VISIBLE_DEVICES=%s)", layout.summary(), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    engine = build_engine(eval_rollout_config(cfg.rollout, layout), str(model_dir), seed=cfg.seed)
    try:
        results = evaluate(engine, tokenizer, eval_cfg.benchmarks, eval_cfg, out, data_cfg=cfg.data,
                           reward_cfg=cfg.reward, seed=cfg.seed)
    finally:
        engine.shutdown()
    print(results.markdown(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'generations'}/")
    return 0
