"""The parts of the vLLM engine that need no vLLM: dtype choice, log-prob mode, name fusion, sum ledger (these run
in the main suite; the engine itself is tested against the real vLLM in test_vllm.py)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import SamplingParams, WeightSyncError
from megatron_lpreg.rollout.vllm import WeightLedger, engine_dtype, engine_param_name, follows_convention, logprobs_mode


@pytest.mark.parametrize("declared, key, expected", [
    ("float32", "torch_dtype", "float32"), ("bfloat16", "dtype", "bfloat16"), ("float", "torch_dtype", "float32"),
])
def test_engine_dtype_follows_config_json_unless_overridden(tmp_path, declared, key, expected):
    (tmp_path / "config.json").write_text(json.dumps({key: declared}))
    assert engine_dtype(RolloutConfig(engine="vllm"), tmp_path) == expected
    assert engine_dtype(RolloutConfig(engine="vllm", dtype="float16"), tmp_path) == "float16"
    (tmp_path / "config.json").write_text("{}")
    assert engine_dtype(RolloutConfig(engine="vllm"), tmp_path) == "auto"


def test_logprobs_mode_is_chosen_so_the_rollout_config_follows_the_convention():
    assert logprobs_mode(RolloutConfig(engine="vllm", top_p=0.9, min_p=0.05, top_k=20)) == "raw_logprobs"
    assert logprobs_mode(RolloutConfig(engine="vllm", temperature=0.7)) == "processed_logprobs"
    with pytest.raises(ConfigError, match="temperature=0.7"):
        logprobs_mode(RolloutConfig(engine="vllm", temperature=0.7, top_p=0.9))


def test_which_requests_follow_the_convention_in_each_mode():
    assert follows_convention("raw_logprobs", SamplingParams(top_p=0.5, min_p=0.1, top_k=5))
    assert follows_convention("raw_logprobs", SamplingParams(temperature=0.6, top_k=1))  # greedy: log_softmax(z)
    assert not follows_convention("raw_logprobs", SamplingParams(temperature=0.6))
    assert follows_convention("processed_logprobs", SamplingParams(temperature=0.6))
    assert not follows_convention("processed_logprobs", SamplingParams(temperature=0.6, top_p=0.95))
    assert not follows_convention("processed_logprobs", SamplingParams(top_k=1))  # truncated to 0.0


def test_hf_names_map_to_vllm_fused_parameters():
    assert engine_param_name("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv_proj.bias"
    assert engine_param_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.gate_up_proj.weight"
    assert engine_param_name("model.layers.0.self_attn.o_proj.weight") == "model.layers.0.self_attn.o_proj.weight"


def _stream(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(f"model.layers.0.self_attn.{p}_proj.weight", torch.randn(4, 8, generator=gen)) for p in "qkv"] + [
        ("model.norm.weight", torch.randn(8, generator=gen)), ("lm_head.weight", torch.randn(16, 8, generator=gen))]


def test_ledger_checks_trainer_checksums_and_engine_sums_in_the_engine_dtype():
    ledger = WeightLedger(dtype=torch.bfloat16)
    tensors = _stream(0)
    assert [n for n, _ in ledger.watch(tensors)] == [n for n, _ in tensors]
    ledger.check_checksums({n: float(t.double().sum()) for n, t in tensors})
    with pytest.raises(WeightSyncError, match="model.norm.weight"):
        ledger.check_checksums({"model.norm.weight": 1e3})
    with pytest.raises(WeightSyncError, match="no such tensor"):
        ledger.check_checksums({"model.embed_tokens.weight": 0.0})
    qkv = torch.cat([t for _, t in tensors[:3]]).to(torch.bfloat16).double()
    engine = {"model.layers.0.self_attn.qkv_proj.weight": [float(qkv.sum()), 96.0],
              "model.norm.weight": [float(tensors[3][1].to(torch.bfloat16).double().sum()), 8.0]}
    assert ledger.check_engine([engine], tied=True) == 2  # tied: vLLM holds no separate lm_head
    assert ledger.complete
    extra = {**engine, "model.embed_tokens.weight": [0.0, 128.0]}  # an engine weight this stream did not carry
    assert ledger.check_engine([extra], tied=True) == 2 and not ledger.complete
    with pytest.raises(WeightSyncError, match="no parameter 'lm_head.weight'"):
        ledger.check_engine([engine], tied=False)
    stale = {**engine, "model.norm.weight": [engine["model.norm.weight"][0] + 0.01, 8.0]}
    with pytest.raises(WeightSyncError, match="does not hold the weights"):
        ledger.check_engine([stale], tied=True)
    halves = [{k: [v[0] / 2, v[1] / 2] for k, v in engine.items()}] * 2  # split over two TP workers
    assert ledger.check_engine(halves, tied=True) == 2


class _RecordingLLM:
    """Records the sleep/wake calls the engine makes (vLLM's sleep mode needs CUDA: nothing here can run it)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))


def test_release_discards_weights_at_sleep_level_2_since_the_update_reloads_them():
    # Level 1 would copy the weights to host and back; the loop reloads them all after resume (trainer/loop.py:
    # release_memory, update, resume_memory, update_weights). The real sleep needs CUDA: gpucheck territory.
    from megatron_lpreg.rollout.vllm import SLEEP_LEVEL, VLLMEngine

    engine = object.__new__(VLLMEngine)
    engine._sleep, engine.llm = True, _RecordingLLM()
    engine.release_memory()
    engine.resume_memory()
    assert SLEEP_LEVEL == 2
    assert engine.llm.calls == [("sleep", 2), ("wake_up", None)]
