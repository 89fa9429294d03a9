"""The math reward: equivalences through math-verify, and the hard deadline on inputs that hang the parser."""
from __future__ import annotations

import threading
import time

import pytest

from megatron_lpreg.config.data import RewardConfig
from megatron_lpreg.reward.deadline import DeadlinePool
from megatron_lpreg.reward.math import MATH_REWARD_PATH, math_reward, precheck
from megatron_lpreg.reward.scorer import RewardScorer, score, score_with_reason

SLACK_S = 1.5
"""Allowed overshoot of a deadline: kill + reply + a loaded 2-core machine (measured overshoot is ~0.05 s)."""

# inputs that make sympy run for minutes (or exhaust memory) when math-verify evaluates them
HANGING = [
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{9^{9}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{" + "1+" * 400_000 + "1}",  # a ~800 kB expression
]


@pytest.fixture(scope="module")
def pool():
    with DeadlinePool(num_workers=2, timeout_s=1.0) as p:
        yield p


@pytest.mark.parametrize(
    "response, truth",
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5"),
        ("so \\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{1/2}", "\\frac12"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{x = 3}", "3"),
        ("first \\boxed{7}, finally \\boxed{\\frac{6}{4}}", "\\frac{3}{2}"),
        ("\\boxed{\\boxed{42}}", "42"),
    ],
)
def test_equivalent_forms_score_one(response, truth):
    result = score_with_reason(response, truth, timeout=10)
    assert result.score == 1.0, result
    assert result.reason in ("match", "verified")


@pytest.mark.parametrize(
    "response, truth, reason",
    [
        ("the answer is 85", "85", "no_box"),
        ("\\boxed{84}", "85", "wrong"),
        ("\\boxed{\\frac{1}{3}}", "0.5", "wrong"),
        ("\\boxed{85} ... \\boxed{7", "85", "no_box"),  # the last box is cut off
        ("\\boxed{7} on second thought \\boxed{8}", "7", "wrong"),
    ],
)
def test_wrong_or_missing_scores_zero(response, truth, reason):
    result = score_with_reason(response, truth, timeout=10)
    assert (result.score, result.reason) == (0.0, reason)


@pytest.mark.parametrize(
    "answer, truth, expected",
    [  # the behaviours docs/rewards.md lists where veRL's prime_math grader decides differently
        ("0.5", "50", 0.0),  # no implicit percent scaling
        ("10\\%", "0.1", 1.0),  # an explicit percent sign is understood
        ("3.14", "\\pi", 0.0),  # pi is not replaced by 3.14
        ("84.9999", "85", 0.0),  # no 1e-4 relative tolerance
        ("1010_2", "10", 0.0),  # a base subscript is not read as "digits before _"
        ("(2,1)", "(1,2)", 0.0),  # tuples are ordered ...
        ("2,1", "\\{1,2\\}", 1.0),  # ... sets are not
        ("(1,2)", "[1,2]", 0.0),  # open and closed intervals differ
        ("5\\text{ cm}", "5", 1.0),  # units are stripped
    ],
)
def test_documented_grader_behaviour(answer, truth, expected):
    assert score(f"\\boxed{{{answer}}}", truth, timeout=10) == expected
    # the worker path too: a boxed ground truth, and a response too long for the caller's precheck
    assert math_reward(f"\\boxed{{{answer}}}", f"\\boxed{{{truth}}}").score == expected
    assert math_reward("x" * 30_000 + f"\\boxed{{{answer}}}", truth).score == expected


def test_fast_path_needs_no_worker():
    assert precheck("\\boxed{ 85 }", "85").reason == "match"
    assert precheck("\\boxed{084}", "85").score == 0.0
    assert precheck("\\boxed{\\frac{1}{2}}", "0.5") is None  # needs math-verify
    assert precheck("x" * 30_000 + "\\boxed{1}", "1") is None  # too long to scan in the caller


@pytest.mark.parametrize(
    "answer, truth, expected",
    [  # D10: integers and decimals compare exactly, in the caller, with no float anywhere
        ("9007199254740993", "9007199254740992", 0.0),  # 2**53 + 1 vs 2**53: equal as floats
        ("123456789012345678901234567891", "123456789012345678901234567890", 0.0),
        ("1" + "0" * 400, "2" + "0" * 400, 0.0),  # both overflow a float to inf: infinities never equal
        ("9" * 5_000, "9" * 4_999 + "8", 0.0),  # beyond int()'s 4,300-digit limit
        ("0.1234567", "0.1234568", 0.0),  # math-verify rounds to 6 decimals and would say equal
        ("0.30000000000000004", "0.3", 0.0),
        ("9007199254740993", "9007199254740993.000", 1.0),
        ("085", "85", 1.0),
        ("-0", "0.0", 1.0),
        ("1" + "0" * 400, "1" + "0" * 400 + ".0", 1.0),
    ],
)
def test_plain_numbers_compare_exactly_without_a_worker(answer, truth, expected):
    result = precheck(f"\\boxed{{{answer}}}", truth)
    assert result is not None, "plain numbers must be decided in the caller, never by math-verify's rounding"
    assert (result.score, result.reason) == (expected, "match" if expected else "wrong")
    assert score(f"\\boxed{{{answer}}}", truth, timeout=10) == expected
    # the worker path too: a boxed ground truth, and a response too long for the caller's precheck
    assert math_reward(f"\\boxed{{{answer}}}", f"\\boxed{{{truth}}}").score == expected
    assert math_reward("x" * 30_000 + f"\\boxed{{{answer}}}", truth).score == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [  # issue 19: scientific notation is a number (Minerva's answer style), decided exactly in the caller
        ("1.5e3", "1500", 1.0),  # math-verify alone reads 1.5 * e * 3
        ("1500", "1.5e3", 1.0),
        ("7.5\\times10^{-7}", "7.5e-7", 1.0),
        ("7.5 \\times 10^{-7}", "0.00000075", 1.0),
        ("3\\times10^{8}", "3e8", 1.0),
        ("3 \\cdot 10^8", "300000000", 1.0),
        ("3.0E+08", "3\\times10^{8}", 1.0),
        ("1.5e3", "1501", 0.0),
        ("7.5e-7", "7.5e-8", 0.0),
        ("-3e8", "3e8", 0.0),
        ("3e8", "3\\times10^{9}", 0.0),
        ("1e999999999", "1e999999998", 0.0),  # exact exponents, never expanded
    ],
)
def test_scientific_notation_is_a_number(answer, truth, expected):
    result = precheck(f"\\boxed{{{answer}}}", truth)
    assert result is not None and (result.score, result.reason) == (expected, "match" if expected else "wrong")
    assert score(f"\\boxed{{{answer}}}", truth, timeout=10) == expected
    assert math_reward("x" * 30_000 + f"\\boxed{{{answer}}}", f"\\boxed{{{truth}}}").score == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [  # an e that is not notation stays Euler's number, judged by math-verify under the deadline
        ("e", "e", 1.0),
        ("2e", "2e", 1.0),
        ("2e", "20", 0.0),  # not 2 x 10^0 nor an incomplete exponent
        ("e^{3}", "e^3", 1.0),
        ("1.5e3", "\\frac{3000}{2}", 1.0),  # e-notation against a fraction: rewritten as 1.5 x 10^3 first
        ("1.5e3", "\\frac{3001}{2}", 0.0),
    ],
)
def test_euler_e_and_notation_against_expressions(answer, truth, expected):
    assert precheck(f"\\boxed{{{answer}}}", truth) is None or answer == truth
    assert score(f"\\boxed{{{answer}}}", truth, timeout=10) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [  # docs/rewards.md, "Where math-verify stays in charge": a number against a non-plain form
        ("0.333333", "\\frac{1}{3}", 1.0),  # math-verify's 6-decimal rounding
        ("0.33333", "\\frac{1}{3}", 0.0),
        ("100000000000000000001", "10^{20}", 0.0),  # powers stay exact integers
        ("\\infty", "\\infty", 1.0),
        ("-\\infty", "\\infty", 0.0),
    ],
)
def test_math_verify_in_charge(answer, truth, expected):
    assert score(f"\\boxed{{{answer}}}", truth, timeout=10) == expected


@pytest.mark.parametrize("response", HANGING[:2])
def test_single_score_returns_within_deadline(response):
    score("\\boxed{\\frac{1}{2}}", "0.5")  # start the worker forker outside the timed region
    start = time.monotonic()
    assert score(response, "5", timeout=1.0) == 0.0
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_batch_hung_samples_time_out_and_others_still_score(pool):
    good = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("\\boxed{\\sqrt{4}}", "2")]
    items = [(h, "5") for h in HANGING] + good
    killed_before = pool.killed
    start = time.monotonic()
    results = pool.map(MATH_REWARD_PATH, items)
    elapsed = time.monotonic() - start
    assert [r.reason for r in results[: len(HANGING)]] == ["timeout"] * len(HANGING)
    assert [r.score for r in results] == [0.0] * len(HANGING) + [1.0, 0.0, 1.0]
    assert pool.killed - killed_before == len(HANGING)
    # 4 hung samples on 2 workers: two rounds of the 1 s deadline
    assert elapsed < 2 * 1.0 + SLACK_S
    assert all(r.seconds < 1.0 + SLACK_S for r in results)


def test_scorer_mixes_fast_and_slow_paths():
    with RewardScorer(RewardConfig(name="math", timeout_s=1.0, num_workers=2)) as scorer:
        results = scorer.score(["\\boxed{85}", "nothing", "\\boxed{0.25}", HANGING[0]], ["85", "1", "\\frac14", "5"])
    assert [(r.score, r.reason) for r in results] == [
        (1.0, "match"), (0.0, "no_box"), (1.0, "verified"), (0.0, "timeout"),
    ]


def test_score_from_many_threads_at_once():
    score("\\boxed{1}", "2")
    out: dict[int, tuple[float, float]] = {}

    def work(i: int) -> None:
        start = time.monotonic()
        response = HANGING[0] if i % 2 else "\\boxed{\\frac{2}{4}}"
        out[i] = (score(response, "0.5", timeout=1.0), time.monotonic() - start)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [out[i][0] for i in range(4)] == [1.0, 0.0, 1.0, 0.0]
    assert max(seconds for _, seconds in out.values()) < 1.0 + SLACK_S


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout"):
        score("\\boxed{1/2}", "0.5", timeout=0)
