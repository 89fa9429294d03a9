"""Rewards: 1/0 math checking on the last \\boxed{} (math-verify) and pluggable functions, all under a hard
per-sample deadline. See docs/rewards.md for the layout."""
from megatron_lpreg.reward.plugin import load_callable
from megatron_lpreg.reward.records import RewardResult, reward_metrics
from megatron_lpreg.reward.registry import BUILTIN_REWARDS, resolve_reward
from megatron_lpreg.reward.scorer import RewardScorer, build_reward, score, score_with_reason

__all__ = [
    "BUILTIN_REWARDS", "RewardResult", "RewardScorer", "build_reward", "load_callable", "resolve_reward",
    "reward_metrics", "score", "score_with_reason",
]
