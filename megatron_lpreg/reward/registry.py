"""Reward functions by name, and :class:`RewardScorer`, which scores rollouts every step under a deadline.

Names: ``math`` (last \\boxed{} + math-verify), ``exact_match``, or a user path ``'package.module:function'``
whose function takes ``(response, ground_truth)`` and returns a float, a ``(float, reason)`` pair or a
:class:`~megatron_lpreg.reward.records.RewardResult`. Every function runs in deadline workers, so a user
function that hangs costs one sample, never the step.
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter
from typing import Any, Callable, Sequence

from megatron_lpreg.config.data import RewardConfig
from megatron_lpreg.reward import exact, math
from megatron_lpreg.reward.records import RewardResult, ScoredGroup
from megatron_lpreg.rollout.base import Completion, iter_groups

logger = logging.getLogger(__name__)

# name -> (function path run in workers, in-process fast path or None)
BUILTIN_REWARDS: dict[str, tuple[str, Callable[[str, str], RewardResult | None] | None]] = {
    "math": (math.MATH_REWARD_PATH, math.precheck),
    "exact_match": (exact.EXACT_MATCH_PATH, None),
}


def load_callable(path: str) -> Callable[..., Any]:
    """Import ``'package.module:function'`` (the attribute may be dotted: ``'pkg.mod:Class.method'``).

    Raises:
        ValueError: malformed path, missing module or attribute, or not callable; the message names the path.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {path!r} must be one of {sorted(BUILTIN_REWARDS)} or 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {path!r} names a {type(obj).__name__}, not a function")
    return obj


def resolve_reward(name: str) -> str:
    """The importable path of reward ``name`` (built-in name or user path), checked to import in this process.

    Raises:
        ValueError: unknown name or a path that does not import (message lists the built-in names).
    """
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name][0]
    load_callable(name)
    return name


class RewardScorer:
    """Scores batches of responses with the configured reward; keeps its deadline workers between batches."""

    def __init__(self, cfg: RewardConfig) -> None:
        """
        Raises:
            ValueError: unknown reward name or bad timeout/worker count (naming the reward.* field).
        """
        from megatron_lpreg.reward.deadline import DeadlinePool

        try:
            self.fn_path = resolve_reward(cfg.name)
        except ValueError as exc:
            raise ValueError(f"reward.name: {exc}") from exc
        cfg.validate()
        self._precheck = BUILTIN_REWARDS[cfg.name][1] if cfg.name in BUILTIN_REWARDS else None
        self.cfg = cfg
        self._pool = DeadlinePool(
            num_workers=cfg.num_workers, timeout_s=cfg.timeout_s, memory_limit_mb=cfg.memory_limit_mb
        )

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``; returns one result each, in order.

        Raises:
            ValueError: the two lists differ in length.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        results: list[RewardResult | None] = [None] * len(responses)
        if self._precheck is not None:
            results = [self._precheck(r, g) for r, g in zip(responses, ground_truths)]
        todo = [i for i, res in enumerate(results) if res is None]
        if todo:
            done = self._pool.map(self.fn_path, [(responses[i], ground_truths[i]) for i in todo])
            for i, res in zip(todo, done):
                results[i] = res
        return [res for res in results if res is not None]

    score_batch = score
    """Alias used by the trainer (``float(result)`` is the score)."""

    def score_groups(self, completions: list[Completion], ground_truths: Sequence[str]) -> list[ScoredGroup]:
        """Score engine output grouped by prompt.

        Args:
            completions: as returned by ``RolloutEngine.generate`` (ordered by prompt, then sample), with ``text``.
            ground_truths: indexed by ``Completion.prompt_index``.

        Returns:
            One :class:`ScoredGroup` per prompt, in prompt order.
        """
        results = self.score([c.text for c in completions], [ground_truths[c.prompt_index] for c in completions])
        groups, offset = [], 0
        for group in iter_groups(completions):
            index = group[0].prompt_index
            groups.append(
                ScoredGroup(
                    prompt_index=index,
                    ground_truth=ground_truths[index],
                    completions=group,
                    results=results[offset : offset + len(group)],
                )
            )
            offset += len(group)
        return groups

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_reward(cfg: RewardConfig) -> RewardScorer:
    """The scorer for ``cfg`` (close it when done; its deadline workers are forked from the reward zygote)."""
    return RewardScorer(cfg)


def reward_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Namespaced metrics for a batch: ``reward/mean``, ``reward/reason/<reason>`` fractions, ``reward/max_s``."""
    if not results:
        return {}
    counts = Counter(r.reason for r in results)
    metrics = {"reward/mean": sum(r.score for r in results) / len(results)}
    metrics.update({f"reward/reason/{k}": v / len(results) for k, v in sorted(counts.items())})
    metrics["reward/max_s"] = max(r.seconds for r in results)
    return metrics
