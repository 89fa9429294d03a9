"""Rewards: 1/0 math checking on the last \\boxed{} (math-verify) and pluggable functions, all under a hard
per-sample deadline. See docs/rewards.md."""
from megatron_lpreg.reward.math import score, score_batch, score_with_reason
from megatron_lpreg.reward.records import RewardResult, ScoredGroup
from megatron_lpreg.reward.registry import (
    BUILTIN_REWARDS, RewardScorer, build_reward, load_callable, resolve_reward, reward_metrics,
)

__all__ = [
    "BUILTIN_REWARDS", "RewardResult", "RewardScorer", "build_reward", "ScoredGroup", "load_callable", "resolve_reward",
    "reward_metrics", "score", "score_batch", "score_with_reason",
]
