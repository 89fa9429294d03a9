"""Reward functions loaded by 'module:function' path in tests/reward/test_scorer.py and test_registry.py."""
from __future__ import annotations

import os
import time


def short_is_good(response: str, ground_truth: str) -> tuple[float, str]:
    return (1.0 if len(response) <= int(ground_truth) else 0.0, "length")


def sleeps_forever(response: str, ground_truth: str) -> float:
    time.sleep(3600)
    return 1.0


def raises(response: str, ground_truth: str) -> float:
    raise RuntimeError("boom")


def crashes(response: str, ground_truth: str) -> float:
    os._exit(3)


NOT_CALLABLE = 42


def allocates_8_gib(response: str, ground_truth: str) -> float:
    block = bytearray(8 * 1024**3)
    return float(len(block))
