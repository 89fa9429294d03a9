"""A dense test reward (``reward.name=tests.slurm.rewards:digit_share``): a random tiny model almost never
answers the synthetic task right, so exact-match rewards are all 0, every advantage is 0 and the parameters
would never move; a resume test on such a run could not fail. The share of digits in a response varies across
responses and makes every step update the parameters."""
from __future__ import annotations


def digit_share(response: str, ground_truth: str) -> float:
    """Fraction of the response's characters that are digits (0.0 for an empty response)."""
    return sum(ch.isdigit() for ch in response) / len(response) if response else 0.0


def digit_share_paced(response: str, ground_truth: str) -> float:
    """:func:`digit_share` that takes 50 ms a response (about 0.4 s a step with 16 responses on 2 workers): a
    preemption test then has a window of seconds, not milliseconds, to land its request before the run ends."""
    import time

    time.sleep(0.05)
    return digit_share(response, ground_truth)
