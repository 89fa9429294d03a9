"""Find the final answer of a math response: the content of its last ``\\boxed{...}``.

The scan is linear in the response length (one ``rfind`` plus one brace walk), so even megabyte outputs are cheap.
"""
from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE = re.compile(r"\\[{}]|[{}]")
_NUMBER = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")


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
