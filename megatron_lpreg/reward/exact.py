"""Exact-match reward: the answer string must equal the ground truth (after trimming whitespace)."""
from __future__ import annotations

from megatron_lpreg.reward.boxed import last_boxed
from megatron_lpreg.reward.records import RewardResult, clip_extracted

EXACT_MATCH_PATH = "megatron_lpreg.reward.exact:exact_match_reward"


def exact_match_reward(response: str, ground_truth: str) -> RewardResult:
    """1.0 if the answer equals ``ground_truth`` exactly (surrounding whitespace ignored), else 0.0.

    The answer is the content of the last \\boxed{} when the response has one, otherwise the whole response, so
    the same function serves boxed math answers and short free-form tasks.

    Args:
        response: model output.
        ground_truth: reference string.

    Returns:
        The result with reason ``match`` or ``wrong``.
    """
    boxed = last_boxed(response)
    answer = (boxed if boxed is not None else response).strip()
    equal = answer == ground_truth.strip()
    return RewardResult(score=float(equal), reason="match" if equal else "wrong", extracted=clip_extracted(answer))
