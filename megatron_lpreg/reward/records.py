"""The record a reward hands back for one response (:class:`RewardResult`) and the metrics of a batch of them.

Pure data: no processes, no imports from the rest of the package.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Reason = Literal["match", "verified", "wrong", "no_box", "unparsable", "timeout", "error"]
"""Why a response got its score:
match (cheap string/number equality), verified (math-verify says equal), wrong (compared, not equal),
no_box (no complete \\boxed{}), unparsable (math-verify could not read the answer), timeout (the per-sample deadline
passed; the worker was killed), error (the reward function raised or its worker died)."""


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    """The score of one response and why."""

    score: float
    reason: str
    """One of :data:`Reason` for the built-in rewards; user functions may return their own strings."""
    extracted: str | None = None
    """The answer the reward compared (the last \\boxed{} content), truncated to 200 characters."""
    seconds: float = 0.0
    """Wall time spent scoring this sample (0 for the in-process fast path)."""
    detail: str = ""
    """Error text for reason=error."""

    def __float__(self) -> float:
        return self.score


def clip_extracted(text: str | None, limit: int = 200) -> str | None:
    """Keep records small: an extracted answer longer than ``limit`` characters is cut with a marker."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"...(+{len(text) - limit} chars)"


def reward_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Namespaced metrics for a batch: ``reward/mean``, ``reward/reason/<reason>`` fractions, ``reward/max_s``."""
    if not results:
        return {}
    counts = Counter(r.reason for r in results)
    metrics = {"reward/mean": sum(r.score for r in results) / len(results)}
    metrics.update({f"reward/reason/{k}": v / len(results) for k, v in sorted(counts.items())})
    metrics["reward/max_s"] = max(r.seconds for r in results)
    return metrics
