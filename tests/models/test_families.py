"""The Qwen facts table drives the config.json writer and reader, the mapping table and the tiny model alike:
what the writer writes the reader reads back unchanged, and each family's flags show up as weights."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ModelConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.models.families import FAMILIES, family, family_of_model_type, hf_config_json
from megatron_lpreg.models.mappings import mapping_table
from megatron_lpreg.models.qwen import model_config_from_hf
from tests.support.tiny import tiny_model_dir


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_written_config_reads_back(arch: str) -> None:
    fam = family(arch)
    head_dim = 32 if fam.explicit_head_dim else 16
    cfg = ModelConfig(arch=arch, vocab_size=1000, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      head_dim=head_dim, tie_word_embeddings=True, params_dtype="bfloat16", rope_theta=5e5)
    config = hf_config_json(cfg, token_ids={"eos_token_id": 7})
    assert config["architectures"] == [fam.architecture] and config["model_type"] == fam.model_type
    assert ("head_dim" in config) == fam.explicit_head_dim and config["eos_token_id"] == 7
    assert hf_dir.torch_dtype(config) is not None and hf_dir.declared_dtype(config) == "bfloat16"
    back = model_config_from_hf(config, base=ModelConfig(params_dtype="bfloat16"))
    assert back == dataclasses.replace(cfg, hf_path="")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_family_flags_are_the_weights(arch: str) -> None:
    fam = family(arch)
    assert family_of_model_type(fam.model_type) is fam and family_of_model_type("llama") is None
    hf_names = {n for r in mapping_table(arch, tie_word_embeddings=False).rows for n in r.hf}
    assert ("model.layers.*.self_attn.q_proj.bias" in hf_names) == fam.qkv_bias
    assert ("model.layers.*.self_attn.q_norm.weight" in hf_names) == fam.qk_layernorm
    stored = set(hf_dir.tensor_names(tiny_model_dir(arch)))
    assert ("model.layers.0.self_attn.q_proj.bias" in stored) == fam.qkv_bias
    assert ("model.layers.0.self_attn.k_norm.weight" in stored) == fam.qk_layernorm
    with pytest.raises(ValueError, match="supported: \\['qwen2', 'qwen3'\\]"):
        family("llama")


def test_config_layer_agrees_with_the_table() -> None:
    """config/ cannot import models/ (layering), so ``ModelConfig`` repeats two facts: the arch names and the
    head_dim rule of families without an explicit head_dim. They must match the table."""
    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["arch"])) == set(FAMILIES)
    for arch, fam in FAMILIES.items():
        cfg = ModelConfig(arch=arch, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=32)
        if fam.explicit_head_dim:
            cfg.validate()
        else:
            with pytest.raises(ConfigError, match="needs head_dim = hidden_size / num_attention_heads"):
                cfg.validate()
