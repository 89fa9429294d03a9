"""The scorer the trainer keeps open: the one scoring entry, for built-ins and user functions that hang, raise,
crash or run out of memory."""
from __future__ import annotations

import time

import pytest

from megatron_lpreg.config.data import RewardConfig
from megatron_lpreg.reward.records import reward_metrics
from megatron_lpreg.reward.scorer import RewardScorer


def test_math_scorer_results_in_order_with_reasons():
    responses = ["\\boxed{85}", "\\boxed{84}", "\\boxed{\\frac{1}{2}}", "no answer"]
    with RewardScorer(RewardConfig(name="math", timeout_s=5.0, num_workers=1)) as scorer:
        results = scorer.score(responses, ["85", "85", "0.5", "0.5"])
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert [r.reason for r in results] == ["match", "wrong", "verified", "no_box"]
    assert float(results[0]) == 1.0
    metrics = reward_metrics(results)
    assert metrics["reward/mean"] == 0.5
    assert metrics["reward/reason/no_box"] == 0.25


def test_scorer_starts_no_worker_for_cheap_samples_and_refuses_use_after_close():
    scorer = RewardScorer(RewardConfig(name="math", num_workers=1))
    assert [r.reason for r in scorer.score(["\\boxed{3}", "none"], ["3", "3"])] == ["match", "no_box"]
    assert scorer._pool is None
    scorer.close()
    with pytest.raises(ValueError, match="2 responses but 1"):
        scorer.score(["a", "b"], ["1"])
    with pytest.raises(RuntimeError, match="after close"):
        scorer.score(["\\boxed{1/2}"], ["0.5"])


def test_exact_match_is_literal():
    with RewardScorer(RewardConfig(name="exact_match", num_workers=1)) as scorer:
        results = scorer.score(["\\boxed{ 0.5 }", "\\boxed{1/2}", "  yes "], ["0.5", "0.5", "yes"])
    assert [r.score for r in results] == [1.0, 0.0, 1.0]


def test_user_function_by_path_with_hang_error_and_crash():
    with RewardScorer(RewardConfig(name="tests.reward.user_rewards:short_is_good", num_workers=2)) as scorer:
        assert [(r.score, r.reason) for r in scorer.score(["abc", "abcdef"], ["4", "4"])] == [
            (1.0, "length"), (0.0, "length"),
        ]
    cfg = RewardConfig(name="tests.reward.user_rewards:sleeps_forever", timeout_s=0.5, num_workers=1)
    with RewardScorer(cfg) as scorer:
        start = time.monotonic()
        assert [r.reason for r in scorer.score(["a", "b"], ["1", "1"])] == ["timeout", "timeout"]
        assert time.monotonic() - start < 2 * 0.5 + 1.5
    with RewardScorer(RewardConfig(name="tests.reward.user_rewards:raises", num_workers=1)) as scorer:
        (result,) = scorer.score(["a"], ["1"])
        assert result.reason == "error" and "boom" in result.detail
    with RewardScorer(RewardConfig(name="tests.reward.user_rewards:crashes", num_workers=1)) as scorer:
        first, second = scorer.score(["a", "b"], ["1", "1"])  # the worker dies twice and is replaced twice
        assert first.reason == second.reason == "error"


def test_memory_limit_fails_the_sample_not_the_worker():
    cfg = RewardConfig(name="tests.reward.user_rewards:allocates_8_gib", num_workers=1, memory_limit_mb=2048)
    with RewardScorer(cfg) as scorer:
        (result,) = scorer.score(["a"], ["1"])
    assert result.reason == "error" and "MemoryError" in result.detail
