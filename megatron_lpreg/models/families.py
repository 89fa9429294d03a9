"""What each supported Qwen architecture is, in one place: one :class:`QwenFamily` row per architecture, the
``config.json`` field names, and the one ``config.json`` writer.

Every other module reads these facts instead of testing ``arch == "qwen2"``: ``models/qwen.py`` (config.json ->
``ModelConfig`` -> ``TransformerConfig``), ``models/mappings.py`` (which weight rows a family adds),
``models/tiny.py`` (which tensors a tiny checkpoint holds) and HF export (:func:`hf_config_json`).

- Qwen2 / Qwen2.5 (``model_type: qwen2``): bias on q/k/v, ``head_dim = hidden / heads`` (config.json has no
  ``head_dim``).
- Qwen3 (``model_type: qwen3``): no q/k/v bias, RMSNorm over ``head_dim`` on every query and key head before RoPE
  (``qk_layernorm``), ``head_dim`` set explicitly (may differ from hidden / heads), ``attention_bias: false``.

Both: RMSNorm, SwiGLU MLP without biases (``hidden_act: silu``), GQA, RoPE (non-interleaved halves) with base
``rope_theta``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_lpreg.config.model import ModelConfig

__all__ = ["FAMILIES", "HF_FIELDS", "QwenFamily", "family", "family_of_model_type", "hf_config_json"]


@dataclass(frozen=True, kw_only=True)
class QwenFamily:
    """The facts about one architecture that the config reader/writer, layer spec, mapping table and tiny model
    need."""

    arch: str
    """``model.arch`` in our config."""
    model_type: str
    """HF ``config.json`` ``model_type``."""
    architecture: str
    """HF ``config.json`` ``architectures[0]`` (the transformers class)."""
    models: str
    """The published model series this covers (for messages and docs)."""
    qkv_bias: bool
    """Biases on the q/k/v projections (megatron ``add_qkv_bias``; HF ``self_attn.{q,k,v}_proj.bias``)."""
    qk_layernorm: bool
    """Per-head RMSNorm of queries and keys before RoPE (megatron ``qk_layernorm``; HF ``self_attn.{q,k}_norm``)."""
    explicit_head_dim: bool
    """config.json states ``head_dim`` and it may differ from ``hidden_size / num_attention_heads``; when False
    it is always ``hidden_size / num_attention_heads`` and config.json does not carry it."""
    config_extras: dict[str, Any] = field(default_factory=dict)
    """Fixed ``config.json`` entries this family writes (besides the shape fields)."""


FAMILIES: dict[str, QwenFamily] = {
    "qwen2": QwenFamily(arch="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM", models="Qwen2, Qwen2.5",
                        qkv_bias=True, qk_layernorm=False, explicit_head_dim=False),
    "qwen3": QwenFamily(arch="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM", models="dense Qwen3",
                        qkv_bias=False, qk_layernorm=True, explicit_head_dim=True,
                        config_extras={"attention_bias": False}),
}
"""``arch`` -> facts. Qwen2.5 checkpoints say ``model_type: qwen2``."""

HF_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings",
}
"""``ModelConfig`` field -> HF ``config.json`` key (the same for every family)."""


def family(arch: str) -> QwenFamily:
    """The facts for ``model.arch``.

    Raises:
        ValueError: an unknown ``arch`` (names the supported ones).
    """
    if arch not in FAMILIES:
        raise ValueError(f"model.arch={arch!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[arch]


def family_of_model_type(model_type: Any) -> QwenFamily | None:
    """The family whose HF ``model_type`` this is, or None."""
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


def hf_config_json(model_cfg: ModelConfig, *, token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` for ``model_cfg``, in the layout of the published Qwen2.5/Qwen3 configs
    (``rope_theta`` at the top level, so transformers 4.x and 5.x and vLLM all read it).

    Args:
        model_cfg: architecture; ``params_dtype`` becomes ``torch_dtype``.
        token_ids: optional ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` entries.
    """
    fam = family(model_cfg.arch)
    config: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.model_type, "attention_dropout": 0.0,
        "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": model_cfg.num_layers,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "use_cache": True,
        "torch_dtype": model_cfg.params_dtype,
    }
    config.update({key: getattr(model_cfg, name) for name, key in HF_FIELDS.items()})
    if not fam.explicit_head_dim:
        del config["head_dim"]
    config.update(fam.config_extras)
    config.update(token_ids or {})
    return config
