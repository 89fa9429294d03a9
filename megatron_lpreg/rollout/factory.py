"""Build the configured rollout engine (``rollout.engine``: local, sglang or vllm)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import Colocation, RolloutEngine

logger = logging.getLogger(__name__)


def build_engine(cfg: RolloutConfig, model_path: str, *, seed: int, model: Any = None) -> RolloutEngine:
    """Create the engine ``cfg.engine`` names.

    Args:
        cfg: rollout config (validated here).
        model_path: Hugging Face model directory (config.json, safetensors, tokenizer); servers load it, and the
            local engine reads vocab size, EOS ids and the tokenizer from it.
        seed: the run's seed (servers' ``--random-seed``; per-request seeds come from ``SamplingParams.seed``).
        model: local engine only: an already-built model to generate from without copying it: the trainer's
            megatron-core GPTModel chunk (or a one-element list of chunks, as the trainer holds them) or a
            ``transformers`` model. None: load ``model_path`` with transformers.

    Returns:
        An object implementing :class:`~megatron_lpreg.rollout.base.RolloutEngine`.

    Raises:
        ConfigError: invalid rollout config.
        ValueError: several model chunks (pipeline parallelism) for the local engine, or no usable model.
    """
    cfg.validate()
    if cfg.engine == "sglang":
        from megatron_lpreg.rollout.sglang import SGLangEngine

        return SGLangEngine(cfg, model_path, seed=seed)
    if cfg.engine == "vllm":
        from megatron_lpreg.rollout.vllm import VLLMEngine

        return VLLMEngine(cfg, model_path, seed=seed)
    return _build_local(cfg, model_path, model)


def runs_embedded(cfg: RolloutConfig, *, pp_size: int, vpp_size: int) -> bool:
    """Whether the configured engine is :attr:`~megatron_lpreg.rollout.base.Colocation.EMBEDDED`: every trainer rank
    runs the local engine in its own process on its own parameters, which needs the whole model on each rank
    (pp == vpp == 1). Otherwise the engine is hosted by trainer rank 0 and receives the weights after each update.
    """
    return cfg.engine == "local" and pp_size <= 1 and vpp_size <= 1


def _build_local(cfg: RolloutConfig, model_path: str, model: Any) -> RolloutEngine:
    from megatron_lpreg.rollout.local import LocalEngine
    from megatron_lpreg.rollout.logits_model import HFLogitsModel

    hf_config = hf_dir.read_config(model_path, missing_ok=True)
    if isinstance(model, Sequence):
        if len(model) != 1:
            raise ValueError(
                f"the local rollout engine needs exactly one model chunk, got {len(model)} (parallel.pp>1 or "
                f"parallel.vpp>1); set parallel.pp=1 and parallel.vpp=1, or use rollout.engine=sglang"
            )
        model = model[0]
    colocation = Colocation.SEPARATE if model is None else Colocation.EMBEDDED
    if model is None:
        if not model_path:
            raise ValueError("build_engine: model_path is empty and no model given; pass an HF model directory")
        adapter = HFLogitsModel.from_pretrained(model_path)
    elif hasattr(model, "config") and hasattr(model, "generation_config"):  # a transformers model
        adapter = HFLogitsModel(model)
    else:
        from megatron_lpreg.rollout.megatron_logits import MegatronLogitsModel

        if "vocab_size" not in hf_config:
            raise ValueError(f"{model_path}/config.json lacks vocab_size; the local engine needs the real vocab size")
        adapter = MegatronLogitsModel(model, vocab_size=int(hf_config["vocab_size"]))
    return LocalEngine(
        adapter, eos_token_ids=hf_dir.eos_token_ids(model_path, hf_config), tokenizer=_tokenizer(model_path),
        max_batch_size=cfg.max_batch_size, colocation=colocation,
    )


def _tokenizer(model_path: str) -> Any:
    """The directory's tokenizer, or None when it has none (text is then left empty)."""
    if not hf_dir.has_tokenizer(model_path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
