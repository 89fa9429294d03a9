"""Typed records the reward side hands to the algorithm: one result per response, one group per prompt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_lpreg.rollout.base import Completion

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


@dataclass(kw_only=True)
class ScoredGroup:
    """All responses to one prompt with their rewards (the unit GRPO normalises over)."""

    prompt_index: int
    ground_truth: str
    completions: list[Completion]
    results: list[RewardResult] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [r.score for r in self.results]

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.results]


def clip_extracted(text: str | None, limit: int = 200) -> str | None:
    """Keep records small: an extracted answer longer than ``limit`` characters is cut with a marker."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"...(+{len(text) - limit} chars)"


def as_result(value: Any) -> RewardResult:
    """Normalise what a reward function returns: a RewardResult, a number, or a (number, reason) pair.

    Raises:
        TypeError: any other return type.
    """
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return RewardResult(score=float(value[0]), reason=str(value[1]))
    if isinstance(value, (bool, int, float)):
        return RewardResult(score=float(value), reason="scored")
    raise TypeError(f"reward function returned {type(value).__name__}; expected float, (float, reason) or RewardResult")
