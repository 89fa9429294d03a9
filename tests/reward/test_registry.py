"""Reward functions by name: built-ins, user paths, and clear errors for names that do not resolve."""
from __future__ import annotations

import pytest

from megatron_lpreg.config.data import RewardConfig
from megatron_lpreg.reward.registry import BUILTIN_REWARDS, load_callable, precheck_for, resolve_reward
from megatron_lpreg.reward.scorer import RewardScorer


def test_builtin_names_resolve_to_worker_paths_and_fast_paths():
    assert resolve_reward("math") == "megatron_lpreg.reward.math:math_reward"
    assert resolve_reward("exact_match") == "megatron_lpreg.reward.exact:exact_match_reward"
    assert precheck_for("math") is BUILTIN_REWARDS["math"][1] is not None
    assert precheck_for("tests.reward.user_rewards:short_is_good") is None
    assert resolve_reward("tests.reward.user_rewards:short_is_good") == "tests.reward.user_rewards:short_is_good"


@pytest.mark.parametrize(
    "name, message",
    [
        ("mathh", "must be one of"),
        ("no_such_pkg.mod:fn", "cannot import module"),
        ("tests.reward.user_rewards:missing", "has no attribute"),
        ("tests.reward.user_rewards:NOT_CALLABLE", "not a function"),
    ],
)
def test_bad_names_fail_clearly(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(name)
    with pytest.raises(ValueError, match="reward.name"):
        RewardScorer(RewardConfig(name=name))


def test_load_callable_dotted_attribute():
    assert load_callable("os.path:join")("a", "b") == "a/b"
