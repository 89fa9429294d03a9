from __future__ import annotations

import pytest

from megatron_lpreg.reward.boxed import last_boxed, normalize_answer, plain_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is \\boxed{85}", "85"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}} done", "\\sqrt{\\frac{a}{b^{2}}}"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are text, not nesting
        ("$\\boxed 7$", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("no box at all", None),
        ("\\boxed{5} and then \\boxed{6", None),  # truncated final box: no final answer
        ("\\boxed", None),
        ("\\boxedfoo{1}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_megabyte_is_fast():
    text = "x" * 2_000_000 + "\\boxed{" + "{a}" * 100_000 + "}"
    assert last_boxed(text) == "{a}" * 100_000


def test_normalize_and_numbers():
    assert normalize_answer(" $ 1 2 $. ") == "12"
    assert plain_number("-3.50") == -3.5
    assert plain_number("085") == 85.0
    assert plain_number("1,000") is None
    assert plain_number("\\frac{1}{2}") is None
