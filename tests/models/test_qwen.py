"""Qwen HF config -> megatron-core model: config parsing, vocab padding, CPU config, and layout invariance.

The published config.json values used below are facts copied from the Qwen2.5-32B and Qwen3-14B model cards.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import megatron.core.models.gpt  # noqa: F401  (imported in the parent so forked ranks start fast)
import megatron.core.pipeline_parallel  # noqa: F401
import pytest
import torch

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.config.run import RunConfig, load_yaml_tree
from megatron_lpreg.models.families import family
from megatron_lpreg.models.qwen import (
    build_gpt_model,
    layer_spec,
    model_config_from_hf,
    padded_vocab_size,
    transformer_config,
)
from megatron_lpreg.parallel.spawn import run_ranks
from tests.support.tiny import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]

QWEN25_32B = {  # Qwen/Qwen2.5-32B config.json
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 27648, "max_position_embeddings": 131072, "max_window_layers": 64, "model_type": "qwen2",
    "num_attention_heads": 40, "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": 131072, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_14B = {  # Qwen/Qwen3-14B config.json
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 17408, "max_position_embeddings": 40960,
    "max_window_layers": 40, "model_type": "qwen3", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize("hf, yaml_name", [(QWEN25_32B, "qwen2.5-32b.yaml"), (QWEN3_14B, "qwen3-14b.yaml")])
def test_real_configs_match_shipped_yaml(hf: dict, yaml_name: str) -> None:
    from_hf = model_config_from_hf(hf, base=ModelConfig(params_dtype="bfloat16"))
    shipped = RunConfig.from_dict(load_yaml_tree(REPO / "configs" / "model" / yaml_name)).model
    assert shipped == from_hf
    assert from_hf.head_dim == 128 and from_hf.num_query_groups == 8 and not from_hf.tie_word_embeddings
    fam = family(from_hf.arch)
    assert fam.qkv_bias == (hf["model_type"] == "qwen2") and fam.qk_layernorm == (hf["model_type"] == "qwen3")


def test_transformers5_rope_parameters_and_tiny_dirs(tiny_qwen2: Path, tiny_qwen3: Path) -> None:
    hf = {k: v for k, v in QWEN3_14B.items() if k != "rope_theta"}
    hf["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert model_config_from_hf(hf).rope_theta == 5e5
    q2, q3 = model_config_from_hf(tiny_qwen2), model_config_from_hf(tiny_qwen3 / "config.json")
    assert (q2.arch, q2.head_dim, q2.tie_word_embeddings, q2.vocab_size, q2.hf_path) == (
        "qwen2", 16, False, 1000, str(tiny_qwen2))
    assert (q3.arch, q3.head_dim, q3.tie_word_embeddings, q3.hidden_size) == ("qwen3", 32, True, 64)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, r"model_type='llama' is not supported; supported: qwen2"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=true is not supported for qwen3"),
    ({"intermediate_size": None}, "intermediate_size"),
])
def test_unsupported_hf_configs_are_rejected(change: dict, match: str) -> None:
    hf = {k: v for k, v in {**QWEN3_14B, **change}.items() if v is not None or k != "intermediate_size"}
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf(hf)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no HF config"):
        model_config_from_hf(tmp_path)


@pytest.mark.parametrize("vocab, divisible_by, tp, expected", [
    (151936, 128, 1, 151936), (151936, 128, 2, 152064), (152064, 128, 8, 152576), (1000, 128, 1, 1024),
    (1000, 128, 3, 1152), (1024, 128, 2, 1024), (1, 1, 1, 1),
])
def test_padded_vocab_size(vocab: int, divisible_by: int, tp: int, expected: int) -> None:
    assert padded_vocab_size(vocab, divisible_by, tp) == expected
    assert ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by).padded_vocab_size(tp) == expected


@pytest.mark.parametrize("parallel, match", [
    (ParallelConfig(tp=3), r"parallel.tp=3 must divide model.num_attention_heads=40; use one of \[1, 2, 4, 5, 8"),
    (ParallelConfig(tp=5), r"parallel.tp=5 must divide model.num_query_groups=8; use one of \[1, 2, 4, 8\]"),
    (ParallelConfig(pp=80), r"parallel.pp=80 x parallel.vpp=1 = 80 pipeline stages exceed model.num_layers=64"),
    (ParallelConfig(pp=3, num_layers_in_first_pipeline_stage=9), r"cannot share the remaining 55 layers"),
    (ParallelConfig(pp=1, vpp=2), r"parallel.vpp=2 needs parallel.pp >= 2"),
    (ParallelConfig(overlap_param_gather=True, overlap_grad_reduce=True),
     r"parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"),
    (ParallelConfig(overlap_param_gather=True, use_distributed_optimizer=True), r"and parallel.overlap_grad_reduce"),
])
def test_layout_validation(parallel: ParallelConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf(QWEN25_32B).validate(parallel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU configuration")
def test_gradient_accumulation_fusion_is_refused_on_cpu() -> None:
    # its kernels are CUDA-only (TE's linears, apex's for megatron's output layer): refused, not silently off
    with pytest.raises(ConfigError, match=r"parallel.gradient_accumulation_fusion=true needs CUDA .* set it false"):
        transformer_config(model_config_from_hf(QWEN3_14B), ParallelConfig(tp=8, gradient_accumulation_fusion=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU configuration")
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_cpu_transformer_config_and_local_spec(arch: str) -> None:
    model_cfg = model_config_from_hf(QWEN25_32B if arch == "qwen2" else QWEN3_14B)
    config = transformer_config(model_cfg, ParallelConfig(tp=8, pp=2))
    fusions = ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
               "apply_rope_fusion", "gradient_accumulation_fusion")
    assert not any(getattr(config, name) for name in fusions)
    assert (config.kv_channels, config.num_query_groups, config.normalization, config.gated_linear_unit) == (
        128, 8, "RMSNorm", True)
    assert config.add_qkv_bias == (arch == "qwen2") and config.qk_layernorm == (arch == "qwen3")
    assert not config.add_bias_linear and config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert config.params_dtype == torch.float32 and config.use_cpu_initialization
    from megatron.core.transformer.identity_op import IdentityOp

    spec = layer_spec(model_cfg).submodules.self_attention.submodules
    assert (spec.q_layernorm is not IdentityOp) == (arch == "qwen3")
    assert (spec.k_layernorm is not IdentityOp) == (arch == "qwen3")
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine needs CUDA"):
        layer_spec(dataclasses.replace(model_cfg, transformer_impl="transformer_engine"))


def _logits_and_grads(rank: int, world: int, hf_dir: str, tp: int, pp: int) -> dict | None:
    """TP/PP forward + backward of our model with the tiny HF weights; last stage reports logits and grads."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    model_cfg = model_config_from_hf(hf_dir)
    parallel_cfg = ParallelConfig(tp=tp, pp=pp)
    ctx = init_parallel(parallel_cfg, seed=0)
    model = build_gpt_model(model_cfg, parallel_cfg)
    load_hf_weights([model], hf_dir, model_cfg, ctx)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    # A fixed random linear functional of the (unpadded) logits as the loss: every logit gets a gradient.
    probe = torch.randn(8, model_cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    kept: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):  # noqa: ANN001, ANN202
        sample = next(data_iterator)
        output = chunk(sample, torch.arange(8).unsqueeze(0), None)

        def loss_func(logits_shard: torch.Tensor) -> tuple[torch.Tensor, dict]:
            full = gather_from_tensor_model_parallel_region(logits_shard)
            assert full.shape[-1] == model_cfg.padded_vocab_size(tp)
            kept.append(full[..., : model_cfg.vocab_size].detach())
            loss = (full[0, :, : model_cfg.vocab_size] * probe).sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens[:1], tokens[1:]]), model=model,
        num_microbatches=2, seq_length=8, micro_batch_size=1, forward_only=False,
    )
    out = None
    if ctx.is_last_pp_stage and ctx.tp_rank == 0:
        out = {"logits": torch.cat(kept), "norm_grad": model.decoder.final_layernorm.weight.grad.clone()}
    destroy_parallel(destroy_process_group=False)
    return out


def test_tp_and_pp_layouts_agree_forward_and_backward() -> None:
    hf_dir = str(tiny_model_dir("qwen3", num_layers=2))
    results = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        found = [r for r in run_ranks(_logits_and_grads, tp * pp, hf_dir, tp, pp, timeout_s=120,
                                      threads_per_rank=1) if r is not None]
        results[(tp, pp)] = found[0]
    ref = results[(1, 1)]
    assert ref["logits"].shape == (2, 8, 1000) and torch.isfinite(ref["norm_grad"]).all()
    assert ref["norm_grad"].abs().max() > 0
    for layout in [(2, 1), (1, 2)]:
        got = results[layout]
        # fp32, same weights: only the TP reduction order differs (~1e-6 on O(1) logits).
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["norm_grad"], ref["norm_grad"], rtol=1e-5, atol=1e-5)


def test_resolve_model_config_takes_architecture_from_checkpoint(tiny_qwen3: Path) -> None:
    from megatron_lpreg.models.qwen import resolve_model_config

    stale = ModelConfig(hf_path=str(tiny_qwen3), arch="qwen2", hidden_size=999, params_dtype="bfloat16")
    resolved = resolve_model_config(stale)
    assert (resolved.arch, resolved.hidden_size, resolved.head_dim, resolved.tie_word_embeddings) == (
        "qwen3", 64, 32, True)
    assert resolved.params_dtype == "bfloat16" and resolved.hf_path == str(tiny_qwen3)
    assert resolve_model_config(ModelConfig()) == ModelConfig()
