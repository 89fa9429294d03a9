"""The trainer's post-sync probe (trainer/sync_probe.py) on real megatron ranks (gloo, TP1 x PP2): the log-probs it
expects are what an engine holding the same weights computes (transformers on the HF checkpoint), so a right sync
passes ``verify_probe`` at the fp32 tolerance, and an engine with one wrong weight fails it."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.rollout.base import WeightSyncError
from megatron_lpreg.rollout.logits_model import HFLogitsModel, teacher_forced_logprobs
from megatron_lpreg.rollout.weight_sync import PROBE_ATOL, probe_atol, verify_probe
from megatron_lpreg.trainer.sync_probe import PROBE_PROMPT_LEN, PROBE_TOKENS, trainer_probe
from tests.support.tiny import tiny_model_dir
from tests.trainer.test_policy import _cfg, _policy


def _probe_on_rank(rank, world, cfg):
    policy, _ = _policy(cfg)
    policy.temperature = 0.7  # the rollout temperature; the probe is scored at 1 and this is restored
    probe = trainer_probe(policy, params_dtype=cfg.model.params_dtype)
    return probe, policy.temperature


def test_the_trainer_probe_matches_a_right_engine_and_catches_a_wrong_weight():
    hf = tiny_model_dir("qwen2")
    results = run_ranks(_probe_on_rank, 2, _cfg(hf, pp=2, world=2), timeout_s=240)
    (probe, temperature), (other, _) = results
    assert temperature == 0.7
    assert probe == other  # every rank (both pipeline stages) holds the same probe
    assert probe.token_ids == PROBE_TOKENS and probe.prompt_len == PROBE_PROMPT_LEN
    assert len(probe.expected_logprobs) == len(PROBE_TOKENS) - PROBE_PROMPT_LEN
    assert probe.atol == PROBE_ATOL["float32"]

    engine = HFLogitsModel.from_pretrained(hf, dtype=torch.float32)
    diff = verify_probe(lambda ids, n: teacher_forced_logprobs(engine, ids, n), probe, engine="right")
    assert diff < 1e-4  # fp32 both sides: summation order only
    with torch.no_grad():
        engine.model.model.layers[1].mlp.down_proj.weight.mul_(0.0)  # one tensor not installed
    with pytest.raises(WeightSyncError, match="wrong: probe log-probs differ"):
        verify_probe(lambda ids, n: teacher_forced_logprobs(engine, ids, n), probe, engine="wrong")


def test_probe_tolerance_follows_the_coarser_dtype():
    assert probe_atol("float32") == PROBE_ATOL["float32"] < probe_atol("float32", "torch.bfloat16")
    assert probe_atol("bfloat16") == probe_atol("float16", "float32") == PROBE_ATOL["bfloat16"]
    with pytest.raises(ValueError, match="no weight-sync probe tolerance for dtype 'int8'"):
        probe_atol("int8")
