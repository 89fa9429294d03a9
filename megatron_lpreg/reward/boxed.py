"""Find the final answer of a math response: the content of its last ``\\boxed{...}``.

The scan is linear in the response length (one ``rfind`` plus one brace walk), so even megabyte outputs are cheap.
"""
from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE = re.compile(r"\\[{}]|[{}]")
_MANTISSA = r"([+-]?)(\d*)(?:\.(\d*))?"
_NUMBER = re.compile(_MANTISSA)
_E_NOTATION = re.compile(_MANTISSA + r"[eE]([+-]?\d{1,9})")
"""``1.5e3``, ``7.5E-7``: a plain decimal, ``e``/``E``, a signed integer exponent (at most 9 digits)."""
_TIMES_TEN = re.compile(r"(?:" + _MANTISSA + r"(?:\\times|\\cdot|×))?10\^(?:\{([+-]?\d{1,9})\}|(\d))")
"""``7.5\\times10^{-7}``, ``3\\cdot10^{8}``, ``3×10^8``, ``10^{5}`` (whitespace already removed)."""
_LATEX_SPACES = re.compile(r"\\[,!;: ]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or the brace-less ``\\boxed 5``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); escaped braces ``\\{ \\}`` do not count. The last
    box is the one that *starts* last, so ``\\boxed{\\boxed{3}}`` gives ``3``. If that box is never closed (a
    truncated response) there is no final answer and the result is None, as in veRL's graders.

    Args:
        text: the model response.

    Returns:
        The box content (not stripped of inner whitespace), or None when there is no complete box.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    pos = start + len(cmd)
    rest = text[pos:]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if cmd == "\\boxed" and rest[:1] == " ":  # "\boxed 5": the answer runs to the next space or '$'
            token = re.match(r"[^\s$]+", stripped)
            return token.group(0) if token else None
        return None
    open_at = pos + (len(rest) - len(stripped))
    depth = 0
    for match in _BRACE.finditer(text, open_at):
        brace = match.group(0)
        if len(brace) == 2:  # an escaped brace is literal text
            continue
        depth += 1 if brace == "{" else -1
        if depth == 0:
            return text[open_at + 1 : match.start()]
    return None


def normalize_answer(answer: str) -> str:
    """Cheap canonical form for string comparison: no whitespace, no surrounding ``$``, no trailing period."""
    out = "".join(answer.split()).strip("$")
    if out.endswith("."):
        out = out[:-1].strip("$")
    return out


def canonical_number(answer: str) -> str | None:
    """Canonical text of ``answer`` if it is a plain decimal number (``85``, ``-3.50``, ``.5``), else None.

    The digits are kept, never converted to a float (2**53 + 1 would become 2**53, a 400-digit value infinity) or
    an int (Python refuses to convert over 4,300 digits): leading zeros of the integer part, trailing zeros of the
    fraction and a ``+`` sign are dropped, and zero has no sign. Two plain numbers are equal exactly when their
    canonical texts are equal.

    Examples: ``"-3.50" -> "-3.5"``, ``"085" -> "85"``, ``"+.50" -> "0.5"``, ``"-0.0" -> "0"``, ``"1,000" -> None``.
    """
    match = _NUMBER.fullmatch(normalize_answer(answer))
    if match is None:
        return None
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    if not whole and not fraction:  # "", "+", "." and "-." are not numbers
        return None
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    text = f"{whole}.{fraction}" if fraction else whole
    return "-" + text if sign == "-" and text != "0" else text


def decimal_value(answer: str) -> tuple[str, str, int] | None:
    """Exact value of a plain or scientific-notation number as ``(sign, digits, exponent)``, else None.

    The value is ``sign digits x 10**exponent`` with no leading or trailing zero in ``digits`` (zero is
    ``("", "0", 0)``), so two numbers are equal exactly when their triples are. Accepted: plain decimals
    (:func:`canonical_number`), e-notation (``1.5e3``, ``7.5E-7``) and a power of ten written in LaTeX
    (``7.5\\times10^{-7}``, ``3\\cdot 10^{8}``, ``3 × 10^8``, ``10^{5}``). A letter ``e`` that is not between a
    number and an integer exponent is not notation: ``e``, ``2e`` and ``e^{3}`` give None (Euler's number stays
    math-verify's). No float and no digit expansion: ``1e999999999`` costs nothing.
    """
    text = _LATEX_SPACES.sub("", normalize_answer(answer))
    for pattern in (_E_NOTATION, _TIMES_TEN):
        match = pattern.fullmatch(text)
        if match is not None:
            break
    else:
        match = _NUMBER.fullmatch(text)
        if match is None:
            return None
        return _normalized(match.group(1), match.group(2), match.group(3), 0)
    sign, whole, fraction, *exponents = match.groups()
    exponent = int(next(e for e in exponents if e is not None))
    if pattern is _TIMES_TEN and whole is None and fraction is None:  # "10^{5}": no mantissa
        return _normalized("", "1", None, exponent)
    return _normalized(sign, whole, fraction, exponent)


def _normalized(sign: str, whole: str | None, fraction: str | None, exponent: int) -> tuple[str, str, int] | None:
    whole, fraction = whole or "", fraction or ""
    if not whole and not fraction:  # "", "+", "." are not numbers
        return None
    digits = (whole + fraction).lstrip("0")
    exponent -= len(fraction)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    if not stripped:
        return ("", "0", 0)
    return ("-" if sign == "-" else "", stripped, exponent)


def latex_scientific(answer: str) -> str:
    """``answer`` with whole-answer e-notation rewritten for math-verify (``1.5e3`` -> ``1.5\\times10^{3}``, which it
    reads as a number; it reads ``1.5e3`` as ``1.5 * e * 3``); any other text unchanged."""
    match = _E_NOTATION.fullmatch(normalize_answer(answer))
    if match is None or not (match.group(2) or match.group(3)):
        return answer
    mantissa = match.group(0)[: match.start(4) - 1]
    return f"{mantissa}\\times10^{{{int(match.group(4))}}}"
