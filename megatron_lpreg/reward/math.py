"""1/0 math reward: the last ``\\boxed{}`` of the response against the ground truth, checked with math-verify.

Pure functions of text. math-verify can hang on adversarial input (towers of exponents, huge factorials, megabyte
expressions) and its own timeouts use SIGALRM, which works only on the main thread. :func:`math_reward` therefore
calls it with ``parsing_timeout=None, timeout_seconds=None`` and must run in a deadline worker
(:mod:`megatron_lpreg.reward.deadline`; :class:`megatron_lpreg.reward.scorer.RewardScorer` arranges that).
:func:`precheck` decides the cheap cases (no box, equal strings, plain numbers) in the calling process without a
worker; plain integers and decimals compare digit by digit (exactly), never as floats, and so do numbers in
scientific notation (``1.5e3`` = ``1500``, ``7.5\\times10^{-7}`` = ``7.5e-7``), which math-verify would read with
Euler's e.
See docs/rewards.md for where this grader can disagree with veRL's prime_math.
"""
from __future__ import annotations

import logging

from megatron_lpreg.reward.boxed import (
    canonical_number,
    decimal_value,
    last_boxed,
    latex_scientific,
    normalize_answer,
)
from megatron_lpreg.reward.records import RewardResult, clip_extracted

logger = logging.getLogger(__name__)

MATH_REWARD_PATH = "megatron_lpreg.reward.math:math_reward"
PRECHECK_MAX_CHARS = 20_000
"""Responses longer than this skip the in-process fast path so the caller never scans unbounded text itself."""


def precheck(response: str, ground_truth: str) -> RewardResult | None:
    """Decide the easy cases in-process: no box -> 0, equal strings -> 1, two plain numbers -> exact comparison.

    Returns:
        A result, or None when math-verify is needed (or the response is too long to scan here).
    """
    if len(response) > PRECHECK_MAX_CHARS:
        return None
    answer = last_boxed(response)
    if answer is None:
        return RewardResult(score=0.0, reason="no_box")
    return _compare_plain(answer, ground_truth)


def _compare_plain(answer: str, gold: str) -> RewardResult | None:
    """Equal text -> 1; two plain or scientific-notation numbers -> exact comparison of their digits and
    exponents; anything else -> None.

    Plain numbers never reach math-verify: it compares decimals after rounding to 6 places (``0.1234567`` =
    ``0.1234568``), and a float comparison would equate 2**53 + 1 with 2**53 or two overflowing values (inf).
    Scientific notation is decided here too: math-verify parses ``1.5e3`` as ``1.5 * e * 3``.
    """
    extracted = clip_extracted(answer)
    if normalize_answer(answer) == normalize_answer(gold):
        return RewardResult(score=1.0, reason="match", extracted=extracted)
    pred_num, gold_num = canonical_number(answer), canonical_number(gold)
    if pred_num is not None and gold_num is not None:
        equal = pred_num == gold_num
        return RewardResult(score=float(equal), reason="match" if equal else "wrong", extracted=extracted)
    pred_value, gold_value = decimal_value(answer), decimal_value(gold)
    if pred_value is not None and gold_value is not None:
        equal = pred_value == gold_value
        return RewardResult(score=float(equal), reason="match" if equal else "wrong", extracted=extracted)
    return None


def math_reward(response: str, ground_truth: str) -> RewardResult:
    """Score one response with no deadline of its own: call this only inside a deadline worker.

    Args:
        response: model output; the answer is the content of its last \\boxed{}.
        ground_truth: reference answer, LaTeX or plain (``\\frac{1}{2}``, ``0.5``); a ``\\boxed{}`` is unwrapped.

    Returns:
        score 1.0 when math-verify finds the answers equal, else 0.0, with the reason.
    """
    quick = precheck(response, ground_truth)
    if quick is not None:
        return quick
    answer = last_boxed(response)
    if answer is None:
        return RewardResult(score=0.0, reason="no_box")
    gold_text = last_boxed(ground_truth) or ground_truth
    plain = _compare_plain(answer, gold_text)  # also for responses too long for the caller's precheck
    if plain is not None:
        return plain
    extracted = clip_extracted(answer)
    from math_verify import parse, verify  # imported lazily: workers preload it, callers need not

    # e-notation against a non-number form (1.5e3 vs \frac{3000}{2}): rewritten as a power of ten first
    gold = parse(f"\\boxed{{{latex_scientific(gold_text)}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{latex_scientific(answer)}}}", parsing_timeout=None)
    if not gold:
        logger.warning("math-verify cannot parse ground truth %r; scoring by string equality only", gold_text[:80])
        return RewardResult(score=0.0, reason="unparsable", extracted=extracted, detail="ground truth")
    if not pred:
        return RewardResult(score=0.0, reason="unparsable", extracted=extracted)
    equal = verify(gold, pred, timeout_seconds=None)
    return RewardResult(score=float(equal), reason="verified" if equal else "wrong", extracted=extracted)

