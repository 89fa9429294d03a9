"""The one seed helper: every seed of a run derives from ``cfg.seed`` and (step, rank, ...) through it."""
from __future__ import annotations


def derive_seed(root: int, *parts: int) -> int:
    """A stable 31-bit seed from the run seed and (step, rank, ...).

    Args:
        root: the run seed (``cfg.seed``).
        parts: what tells this draw apart from the others (step, sampling stream, rank, purpose).

    Returns:
        A seed in ``[0, 2**31)``, the same for the same arguments on every machine and Python version.
    """
    value = root & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + (part & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF
    return value & 0x7FFFFFFF
