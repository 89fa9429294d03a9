"""Qwen2 / Qwen2.5 / Qwen3 as megatron-core GPTModels: HF config -> ModelConfig -> TransformerConfig + layer spec.

What differs between the families (QKV bias, QK-norm, explicit ``head_dim``) is read from
:mod:`megatron_lpreg.models.families`; the ``config.json`` itself through :mod:`megatron_lpreg.models.hf_dir`.
On CPU the local layer spec is used with every fusion off; on GPU the Transformer Engine spec when TE imports.
The embedding/output vocabulary is padded as Megatron-LM does (see :func:`padded_vocab_size`); the padded rows'
logits must be sliced off (``logits[..., :vocab_size]``) before any softmax.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ModelConfig, ParallelConfig, padded_vocab_size, uneven_pipeline_fields
from megatron_lpreg.models import hf_dir
from megatron_lpreg.models.families import FAMILIES, HF_FIELDS, family, family_of_model_type
from megatron_lpreg.parallel import cpu

logger = logging.getLogger(__name__)

__all__ = ["build_gpt_model", "build_model_chunks", "layer_spec", "model_config_from_hf", "padded_vocab_size",
           "resolve_model_config", "transformer_config", "use_transformer_engine"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_hf_config(src: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(src, Mapping):
        return dict(src), "<config dict>"
    path = Path(src)
    return hf_dir.read_config(path), str(path / hf_dir.CONFIG_FILE if path.is_dir() else path)


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    """RoPE base: top-level ``rope_theta`` (published Qwen configs) or ``rope_parameters`` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"{where}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
                              f"only plain RoPE is. Remove rope_scaling to train at the native context length")
    theta = hf.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta (nor rope_parameters.rope_theta)")
    return float(theta)


def model_config_from_hf(src: str | os.PathLike | Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from an HF Qwen2/Qwen2.5/Qwen3 ``config.json``.

    Args:
        src: model directory, path to ``config.json``, or the parsed dict.
        base: non-architecture fields (dtype, transformer_impl, paths, vocab divisor) are taken from here;
            architecture fields always come from the HF config. ``hf_path`` is set when ``src`` is a path.

    Returns:
        The validated config.

    Raises:
        ConfigError: unsupported ``model_type`` (names the supported ones), sliding-window attention, RoPE scaling,
            a non-SiLU activation, Qwen3 with attention bias, or missing/inconsistent fields.
    """
    hf, where = _read_hf_config(src)
    fam = family_of_model_type(hf.get("model_type"))
    if fam is None:
        supported = ", ".join(f"{f.model_type} ({f.models})" for f in FAMILIES.values())
        raise ConfigError(f"{where}: model_type={hf.get('model_type')!r} is not supported; supported: {supported}")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported; set it false")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (Qwen uses silu)")
    if not fam.qkv_bias and hf.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for {fam.arch}")
    key = HF_FIELDS
    try:
        hidden, heads = int(hf[key["hidden_size"]]), int(hf[key["num_attention_heads"]])
        fields = dict(
            arch=fam.arch, vocab_size=int(hf[key["vocab_size"]]), hidden_size=hidden,
            ffn_hidden_size=int(hf[key["ffn_hidden_size"]]), num_layers=int(hf[key["num_layers"]]),
            num_attention_heads=heads, num_query_groups=int(hf.get(key["num_query_groups"]) or heads),
            head_dim=int(hf.get(key["head_dim"]) or hidden // heads),
            max_position_embeddings=int(hf[key["max_position_embeddings"]]), rope_theta=_rope_theta(hf, where),
            rms_norm_eps=float(hf.get(key["rms_norm_eps"], 1e-6)),
            tie_word_embeddings=bool(hf.get(key["tie_word_embeddings"], False)),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: required field {exc.args[0]!r} is missing") from exc
    if not isinstance(src, Mapping):
        fields["hf_path"] = str(Path(src) if Path(src).is_dir() else Path(src).parent)
    cfg = dataclasses.replace(base or ModelConfig(), **fields)
    cfg.validate()
    return cfg


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with its architecture filled from ``cfg.hf_path``'s config.json (unchanged when hf_path is empty).

    Architecture values that were set in ``cfg`` and differ from the checkpoint are logged: the checkpoint wins.
    """
    if not cfg.hf_path:
        cfg.validate()
        return cfg
    resolved = model_config_from_hf(cfg.hf_path, base=cfg)
    changed = [f"{f.name}: {getattr(cfg, f.name)!r} -> {getattr(resolved, f.name)!r}"
               for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(resolved, f.name)]
    if changed:
        logger.info("model config from %s/config.json: %s", cfg.hf_path, "; ".join(changed))
    return resolved


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Whether to use the Transformer Engine spec: ``transformer_impl`` plus what this machine has.

    Raises:
        ConfigError: ``transformer_impl=transformer_engine`` without CUDA or without transformer_engine installed.
    """
    if model_cfg.transformer_impl == "local":
        return False
    have_cuda = cpu.cuda_available()
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    if model_cfg.transformer_impl == "transformer_engine" and not (have_cuda and have_te):
        missing = "CUDA" if not have_cuda else "the transformer_engine package (pip install '.[te]')"
        raise ConfigError(f"model.transformer_impl=transformer_engine needs {missing}; use auto or local")
    return have_cuda and have_te


def transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> Any:
    """megatron-core ``TransformerConfig`` for this model and layout.

    Dropout is off (RL fine-tuning, and it keeps HF parity exact). Every kernel fusion is off unless the
    Transformer Engine spec is used on GPU (the local CPU path has no apex/TE kernels).

    Raises:
        ConfigError: an invalid model/parallel combination (see ``ModelConfig.validate``).
    """
    from megatron.core.transformer import TransformerConfig

    model_cfg.validate(parallel_cfg)
    te = use_transformer_engine(model_cfg)
    if parallel_cfg.sequence_parallel and not te:
        raise ConfigError("parallel.sequence_parallel=true needs the Transformer Engine spec (GPU); set it false")
    _check_gradient_accumulation_fusion(parallel_cfg, te)
    dtype = _DTYPES[model_cfg.params_dtype]
    fam = family(model_cfg.arch)
    return TransformerConfig(
        num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size, num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups, kv_channels=model_cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=model_cfg.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=fam.qkv_bias,
        qk_layernorm=fam.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        attention_softmax_in_fp32=True, apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=parallel_cfg.tp, pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp if parallel_cfg.vpp > 1 else None,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
        use_cpu_initialization=not cpu.cuda_available(),
        bias_activation_fusion=te, masked_softmax_fusion=te, persist_layer_norm=te, bias_dropout_fusion=te,
        apply_rope_fusion=te, gradient_accumulation_fusion=parallel_cfg.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=False,
        **_recompute_kwargs(parallel_cfg),
        **uneven_pipeline_fields(model_cfg.num_layers, parallel_cfg),  # layers per stage: config.model.pipeline_layers
    )


def _check_gradient_accumulation_fusion(parallel_cfg: ParallelConfig, te: bool) -> None:
    """Refuse ``parallel.gradient_accumulation_fusion`` where its kernels are missing: the Transformer Engine
    layers fuse it themselves, but megatron's own output layer needs NVIDIA apex's ``fused_weight_gradient_mlp_cuda``
    (``ColumnParallelLinear.__init__`` raises without it, megatron/core/tensor_parallel/layers.py:924)."""
    if not parallel_cfg.gradient_accumulation_fusion:
        return
    if not te:
        raise ConfigError("parallel.gradient_accumulation_fusion=true needs CUDA and the Transformer Engine spec "
                          "(fused weight-gradient kernels); set it false on CPU or with model.transformer_impl=local")
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        raise ConfigError("parallel.gradient_accumulation_fusion=true needs NVIDIA apex's "
                          "fused_weight_gradient_mlp_cuda extension for megatron's output layer (build apex with "
                          "--cpp_ext --cuda_ext on the GPU nodes), or set parallel.gradient_accumulation_fusion=false")


def _recompute_kwargs(parallel_cfg: ParallelConfig) -> dict[str, Any]:
    """megatron's recompute settings for ``parallel.recompute``."""
    if parallel_cfg.recompute == "none":
        return {}
    if parallel_cfg.recompute == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def layer_spec(model_cfg: ModelConfig) -> Any:
    """Transformer layer ``ModuleSpec``: Transformer Engine on GPU when available, else the local spec.

    Both carry RMSNorm and, for Qwen3, per-head q/k RMSNorm.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    qk_layernorm = family(model_cfg.arch).qk_layernorm
    if use_transformer_engine(model_cfg):
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


def build_gpt_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    initialize: bool = True,
) -> Any:
    """Build this rank's megatron-core ``GPTModel`` (one pipeline chunk) for a Qwen config. Weights are random.

    Call after :func:`megatron_lpreg.parallel.bootstrap.init_parallel` with the same ``parallel_cfg``. Output
    logits are vocab-parallel (``parallel_output=True``): ``[b, s, padded_vocab / tp]`` on the last stage.

    Args:
        model_cfg: architecture (resolve it from ``hf_path`` first with :func:`resolve_model_config`).
        parallel_cfg: the layout the process groups were created with.
        pre_process / post_process: whether this chunk holds the embedding / the final norm and output layer;
            default: first / last (virtual) pipeline stage of this rank.
        vp_stage: virtual pipeline stage index of this chunk (required when ``parallel_cfg.vpp > 1``).
        initialize: False skips weight initialisation (parameters are left uninitialised): for callers that
            overwrite every weight (checkpoint loading, conversion), and it avoids megatron's CPU init path, which
            materialises each full fp32 master weight on every rank.

    Raises:
        ConfigError: invalid layout for the model, or ``vp_stage`` inconsistent with ``parallel_cfg.vpp``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model_cfg, parallel_cfg)
    config.perform_initialization = initialize
    if parallel_cfg.vpp > 1 and vp_stage is None:
        raise ConfigError(f"parallel.vpp={parallel_cfg.vpp}: pass vp_stage (0..{parallel_cfg.vpp - 1}) per chunk, "
                          f"or use build_model_chunks()")
    if vp_stage is not None and not 0 <= vp_stage < parallel_cfg.vpp:
        raise ConfigError(f"vp_stage={vp_stage} is outside parallel.vpp={parallel_cfg.vpp}")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    with cpu.cpu_mode():
        model = GPTModel(
            config=config, transformer_layer_spec=layer_spec(model_cfg),
            vocab_size=model_cfg.padded_vocab_size(parallel_cfg.tp),
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=model_cfg.rope_theta,
            vp_stage=vp_stage,
        )
    if cpu.cuda_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, initialize: bool = True) -> list[Any]:
    """All of this rank's model chunks: one per virtual pipeline stage (a single chunk without VPP)."""
    if parallel_cfg.vpp == 1:
        return [build_gpt_model(model_cfg, parallel_cfg, initialize=initialize)]
    return [build_gpt_model(model_cfg, parallel_cfg, vp_stage=v, initialize=initialize)
            for v in range(parallel_cfg.vpp)]
