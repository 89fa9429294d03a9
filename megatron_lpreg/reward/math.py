"""1/0 math reward: the last ``\\boxed{}`` of the response against the ground truth, checked with math-verify.

math-verify can hang on adversarial input (towers of exponents, huge factorials, megabyte expressions) and its own
timeouts use SIGALRM, which works only on the main thread. We therefore call it with ``parsing_timeout=None,
timeout_seconds=None`` and run it in worker processes with a hard deadline (:mod:`megatron_lpreg.reward.deadline`).
Cheap cases (no box, equal strings, plain numbers) are decided in the calling process without a worker; plain
integers and decimals compare digit by digit (exactly), never as floats.
See docs/rewards.md for where this grader can disagree with veRL's prime_math.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

from megatron_lpreg.reward.boxed import canonical_number, last_boxed, normalize_answer
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
    """Equal text -> 1; two plain numbers -> exact comparison of their digits; anything else -> None.

    Plain numbers never reach math-verify: it compares decimals after rounding to 6 places (``0.1234567`` =
    ``0.1234568``), and a float comparison would equate 2**53 + 1 with 2**53 or two overflowing values (inf).
    """
    extracted = clip_extracted(answer)
    if normalize_answer(answer) == normalize_answer(gold):
        return RewardResult(score=1.0, reason="match", extracted=extracted)
    pred_num, gold_num = canonical_number(answer), canonical_number(gold)
    if pred_num is not None and gold_num is not None:
        equal = pred_num == gold_num
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

    gold = parse(f"\\boxed{{{gold_text}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not gold:
        logger.warning("math-verify cannot parse ground truth %r; scoring by string equality only", gold_text[:80])
        return RewardResult(score=0.0, reason="unparsable", extracted=extracted, detail="ground truth")
    if not pred:
        return RewardResult(score=0.0, reason="unparsable", extracted=extracted)
    equal = verify(gold, pred, timeout_seconds=None)
    return RewardResult(score=float(equal), reason="verified" if equal else "wrong", extracted=extracted)


def score(response: str, ground_truth: str, timeout: float = 5.0) -> float:
    """1.0 if the last \\boxed{} of ``response`` equals ``ground_truth`` (math-verify), else 0.0.

    Safe from any thread. Hard cases run in a fresh worker process that is killed after ``timeout`` seconds
    (a hung parse scores 0). Worker start-up adds ~0.05 s (plus ~1 s once per process while the forkserver
    starts) on top of ``timeout``; cheap cases return in microseconds.

    Args:
        response: model output.
        ground_truth: reference answer.
        timeout: per-sample deadline in seconds (> 0).

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: timeout <= 0.
    """
    return score_with_reason(response, ground_truth, timeout=timeout).score


def score_with_reason(response: str, ground_truth: str, timeout: float = 5.0) -> RewardResult:
    """Like :func:`score` but returns the full :class:`RewardResult` (reason, extracted answer, time)."""
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    quick = precheck(response, ground_truth)
    if quick is not None:
        return quick
    return score_batch([response], [ground_truth], timeout=timeout, num_workers=1)[0]


def score_batch(
    responses: Sequence[str], ground_truths: Sequence[str], *, timeout: float = 5.0, num_workers: int = 2
) -> list[RewardResult]:
    """Score many responses in a throw-away process pool with a per-sample deadline.

    For repeated use (every RL step) keep a :class:`megatron_lpreg.reward.registry.RewardScorer` open instead;
    it keeps its workers alive between batches.

    Args:
        responses: model outputs.
        ground_truths: one reference per response.
        timeout: per-sample deadline in seconds, counted from when a worker starts on the sample.
        num_workers: worker processes.

    Returns:
        One result per response, in order.
    """
    from megatron_lpreg.reward.deadline import DeadlinePool

    if len(responses) != len(ground_truths):
        raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
    results: list[RewardResult | None] = [precheck(r, g) for r, g in zip(responses, ground_truths)]
    todo = [i for i, res in enumerate(results) if res is None]
    if todo:
        start = time.monotonic()
        with DeadlinePool(num_workers=min(num_workers, len(todo)), timeout_s=timeout) as pool:
            hard = pool.map(MATH_REWARD_PATH, [(responses[i], ground_truths[i]) for i in todo])
        for i, res in zip(todo, hard):
            results[i] = res
        logger.debug("scored %d hard samples in %.2fs", len(todo), time.monotonic() - start)
    return [res for res in results if res is not None]
