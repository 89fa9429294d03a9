from __future__ import annotations

import pytest

from megatron_lpreg.reward.boxed import (
    canonical_number,
    decimal_value,
    last_boxed,
    latex_scientific,
    normalize_answer,
)


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
    assert canonical_number("-3.50") == "-3.5"
    assert canonical_number("085") == "85"
    assert canonical_number("+.50") == "0.5"
    assert canonical_number("7.") == "7"
    assert canonical_number("-0.000") == "0"
    assert canonical_number("1,000") is None
    assert canonical_number("\\frac{1}{2}") is None
    assert canonical_number("inf") is None and canonical_number("nan") is None


def test_canonical_numbers_keep_every_digit():
    """No float conversion anywhere: 2**53 + 1, 30-digit and 5,000-digit values keep their last digit, and a
    number too large for a float never becomes infinity (int() of > 4,300 digits would even raise)."""
    assert canonical_number("9007199254740993") != canonical_number("9007199254740992")
    assert canonical_number("123456789012345678901234567891") == "123456789012345678901234567891"
    huge = "1" * 5_000
    assert canonical_number(huge) == huge
    assert canonical_number(huge[:-1] + "2") != canonical_number(huge)
    assert canonical_number("0." + "0" * 400 + "1") == "0." + "0" * 400 + "1"


def test_decimal_value_reads_scientific_notation_exactly():
    assert decimal_value("1500") == decimal_value("1.5e3") == decimal_value("1.5E+3") == ("", "15", 2)
    assert decimal_value("7.5\\times10^{-7}") == decimal_value("7.5e-7") == decimal_value("0.00000075")
    assert decimal_value("3 \\times 10^{8}") == decimal_value("3e8") == decimal_value("3\\cdot10^8") == ("", "3", 8)
    assert decimal_value("3×10^{8}") == ("", "3", 8) and decimal_value("10^{8}") == ("", "1", 8)
    assert decimal_value("-2.50e-1") == ("-", "25", -2) and decimal_value("-0.0e5") == ("", "0", 0)
    assert decimal_value("1e999999999") == ("", "1", 999_999_999)  # no expansion of the digits
    assert decimal_value("1e9999999999") is None  # exponent over 9 digits: not read as a number here
    for text in ("e", "2e", "e3", "e^{3}", "2e^{3}", "1.5e3.1", "10^{x}", "\\times10^{3}", "1,5e3"):
        assert decimal_value(text) is None, text


def test_latex_scientific_rewrites_only_whole_e_notation():
    assert latex_scientific("1.5e3") == "1.5\\times10^{3}"
    assert latex_scientific(" -7.5E-07 ") == "-7.5\\times10^{-7}"
    for text in ("2e", "e", "\\frac{3}{2}e3x", "x+1e3", "1500"):
        assert latex_scientific(text) == text
