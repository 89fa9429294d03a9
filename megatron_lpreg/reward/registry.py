"""Reward functions by name: the built-ins and user paths, resolved to an importable ``'module:function'`` path.

Names: ``math`` (last \\boxed{} + math-verify), ``exact_match``, or a user path ``'package.module:function'``
whose function follows the plug-in contract of :mod:`megatron_lpreg.reward.plugin`. Pure lookups: nothing here
starts a process (:mod:`megatron_lpreg.reward.scorer` runs the resolved function in deadline workers).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from megatron_lpreg.reward import exact, math
from megatron_lpreg.reward.plugin import load_callable
from megatron_lpreg.reward.records import RewardResult

logger = logging.getLogger(__name__)

Precheck = Callable[[str, str], RewardResult | None]
"""An in-process fast path: a result for the cheap cases, None when the sample needs a deadline worker."""

# name -> (function path run in workers, in-process fast path or None)
BUILTIN_REWARDS: dict[str, tuple[str, Precheck | None]] = {
    "math": (math.MATH_REWARD_PATH, math.precheck),
    "exact_match": (exact.EXACT_MATCH_PATH, None),
}


def resolve_reward(name: str) -> str:
    """The importable path of reward ``name`` (built-in name or user path), checked to import in this process.

    Raises:
        ValueError: unknown name or a path that does not import (message lists the built-in names).
    """
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name][0]
    if ":" not in name:
        raise ValueError(f"reward function {name!r} must be one of {sorted(BUILTIN_REWARDS)} or "
                         "'package.module:function'")
    load_callable(name)
    return name


def precheck_for(name: str) -> Precheck | None:
    """The in-process fast path of built-in reward ``name``; None for user functions (they always run in workers)."""
    return BUILTIN_REWARDS[name][1] if name in BUILTIN_REWARDS else None
