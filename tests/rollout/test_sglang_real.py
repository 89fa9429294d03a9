"""The SGLang engine against real SGLang 0.5.23 servers on this CPU (marker ``sglang``; ``make test-sglang`` runs them
in ``.venv-sglang``, where a server that cannot start is a failure, never a skip).

One server for the module (a start takes 22-80 s on two shared cores and ~2.1 GB RSS), launched by the project's own
``SGLangEngine`` + ``LocalServers`` with ``rollout.sglang_device=cpu``, on a tiny fp32 Qwen2 (head_dim 32, 2 heads,
1 KV head, vocab 1000) served in fp32 (``rollout.dtype=float32``). The tests run in file order on that server:
generation with log-probs against transformers fp32; distributed sync over a gloo group SGLang joins with its own
``init_custom_process_group``; tensor sync through CPU shared memory; the post-sync probe (and a wrong probe
refused); release/resume (no-ops on CPU: ``--enable-memory-saver`` needs CUDA); the server killed with SIGKILL,
restarted by the engine and brought back by a second group with a new name. The last test is the acceptance
command: two training steps of configs/tiny_cpu.yaml with ``rollout.engine=sglang``. Faults a real server cannot be
made to show (hang, dropped connection, 500, bad JSON) stay with the stand-in (tests/rollout/test_sglang.py).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.gpucheck.rollout import max_logprob_diff
from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import Colocation, LogprobProbe, SamplingParams, WeightSyncError, WeightUpdate
from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe, teacher_forced_logprobs
from tests.support.sglang_real import require_sglang
from tests.support.tiny import tiny_model_dir

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [42, 43]]
GREEDY = SamplingParams(top_k=1, max_new_tokens=8)
PROBE_TOKENS = [3, 4, 5, 6, 7, 8, 9]
FP32_ATOL = 1e-3
"""SGLang's fp32 torch-native CPU path vs transformers' fp32 forward, float64 log-softmax (measured ~1e-6)."""
MODEL_ARGS = {"seed": 3, "num_attention_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 256}
"""head_dim 32 (the tiny default's 16 is below what the CPU attention backends are built for)."""


def _cfg(**overrides) -> RolloutConfig:
    return RolloutConfig(engine="sglang", sglang_device="cpu", dtype="float32", weight_sync_backend="gloo",
                         weight_sync_host="127.0.0.1", weight_sync="distributed", launch_timeout_s=600,
                         max_retries=1, retry_backoff_s=0.2, **overrides)


def _reference(model_dir: Path, completions) -> float:
    """Largest |engine - transformers fp32| log-prob over all tokens (the GPU check's own comparison)."""
    return max_logprob_diff(HFLogitsModel.from_pretrained(model_dir), completions)


def _greedy_ids(engine) -> list[list[int]]:
    return [c.response_ids for c in engine.generate(PROMPTS, GREEDY)]


def _probe(model_dir: Path, atol: float = FP32_ATOL) -> LogprobProbe:
    return make_probe(HFLogitsModel.from_pretrained(model_dir), PROBE_TOKENS, 3, atol=atol)


@pytest.fixture(scope="module")
def base() -> Path:
    return tiny_model_dir("qwen2", **MODEL_ARGS)


@pytest.fixture(scope="module")
def other() -> Path:
    """Same architecture as ``base``, other weights."""
    return tiny_model_dir("qwen2", **{**MODEL_ARGS, "seed": 11})


@pytest.fixture(scope="module")
def engine(base):
    require_sglang()
    from megatron_lpreg.rollout.sglang import SGLangEngine

    eng = SGLangEngine(_cfg(), str(base), seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def greedy_base(engine, base) -> list[list[int]]:
    """The server's greedy responses on the initial weights (taken before any sync)."""
    return _greedy_ids(engine)


def test_generate_logprobs_match_transformers_fp32(engine, base, greedy_base):
    greedy = engine.generate(PROMPTS, GREEDY)
    sampled = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, seed=4, top_p=0.9))
    assert [c.response_ids for c in greedy] == greedy_base
    assert [(c.prompt_index, c.sample_index) for c in sampled] == [(i, j) for i in range(3) for j in range(3)]
    assert all(len(c.logprobs) == len(c.response_ids) == 8 for c in greedy + sampled)
    assert _reference(base, greedy) < FP32_ATOL
    assert _reference(base, sampled) < FP32_ATOL  # log-probs of the full distribution, before top_p
    model = HFLogitsModel.from_pretrained(base)
    for comp in greedy:  # greedy = transformers' argmax at every step
        logits = model.sequence_logits(comp.prompt_ids + comp.response_ids)
        assert logits[len(comp.prompt_ids) - 1 : -1].argmax(-1).tolist() == comp.response_ids


def test_distributed_sync_over_gloo_installs_the_weights_and_passes_the_probe(engine, other, greedy_base, caplog):
    assert engine.cfg.weight_sync == "distributed" and engine.cfg.weight_sync_backend == "gloo"
    with caplog.at_level("INFO"):
        engine.update_weights(WeightUpdate(version=1, tensors=hf_dir.iter_tensors(other), probe=_probe(other)))
    assert "probe ok" in caplog.text
    assert engine.health().weight_version == 1
    expected = teacher_forced_logprobs(HFLogitsModel.from_pretrained(other), PROBE_TOKENS, 3)
    served = engine.clients[0].score(PROBE_TOKENS, 3)
    assert max(abs(a - b) for a, b in zip(served, expected)) < FP32_ATOL
    after = engine.generate(PROMPTS, GREEDY)
    assert [c.response_ids for c in after] != greedy_base
    assert _reference(other, after) < FP32_ATOL


def test_a_probe_the_server_does_not_match_is_refused(engine, other):
    wrong = LogprobProbe(token_ids=tuple(PROBE_TOKENS), prompt_len=3, expected_logprobs=(0.0,) * 4, atol=FP32_ATOL)
    with pytest.raises(WeightSyncError, match="probe"):
        engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(other), probe=wrong))
    assert engine.health().weight_version == 1


def test_tensor_sync_through_shared_memory_restores_the_base_weights(engine, base, greedy_base):
    engine.cfg = replace(engine.cfg, weight_sync="tensor")  # the same server, the other transport
    try:
        engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(base), probe=_probe(base)))
    finally:
        engine.cfg = replace(engine.cfg, weight_sync="distributed")
    assert engine.health().weight_version == 2
    assert _greedy_ids(engine) == greedy_base


def test_release_and_resume_answer_and_keep_the_weights(engine, greedy_base):
    """Colocated engines release around each update; on CPU SGLang runs without the memory saver (it needs
    CUDA), so both calls succeed and free nothing: the server still holds and serves the same weights."""
    assert engine.colocation is Colocation.COLOCATED
    engine.release_memory()
    engine.resume_memory()
    assert _greedy_ids(engine) == greedy_base


def test_a_killed_server_is_restarted_and_rejoins_through_a_new_group(engine, other):
    servers = engine.servers
    old = servers.engines[0]
    os.killpg(servers.processes[0].proc.pid, signal.SIGKILL)
    from megatron_lpreg.rollout.sglang import SGLangError

    # The restarted server holds the initial checkpoint, not version 2: it serves nothing until the next sync.
    with pytest.raises(SGLangError, match="no rollout engine left"):
        engine.generate(PROMPTS, GREEDY)
    info = servers.engines[0]
    assert info.restarts == old.restarts + 1 and info.pid != old.pid and engine.clients[0].healthy()
    engine.update_weights(WeightUpdate(version=3, tensors=hf_dir.iter_tensors(other), probe=_probe(other)))
    after = engine.generate(PROMPTS, GREEDY)
    assert _reference(other, after) < FP32_ATOL
    assert engine.health().weight_version == 3


def test_two_training_steps_with_real_sglang_log_the_mismatch(tmp_path):
    """The acceptance command, as CI runs it: a real server launched on CPU by the trainer, two Lp-Reg steps with
    weight sync after each, and ``rollout/logprob_mismatch`` on every metrics row (fp32 engine: small)."""
    require_sglang()
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg", "train", "configs/tiny_cpu.yaml", "rollout.engine=sglang",
         "trainer.max_steps=2", f"trainer.output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["step"] for row in rows] == [0, 1]
    mismatches = [row["rollout/logprob_mismatch"] for row in rows]
    print("rollout/logprob_mismatch per step:", mismatches)
    assert all(math.isfinite(m) and 0.0 <= m < FP32_ATOL for m in mismatches), mismatches
