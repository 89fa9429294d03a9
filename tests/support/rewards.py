"""Reward functions for trainer tests, loaded by path (``reward.name=tests.support.rewards:even_length``).

A random tiny model never solves the synthetic task, so every reward would be 0 and every advantage 0: such a
run never updates its weights and cannot show that resume is exact. This reward varies with any model."""
from __future__ import annotations


def even_length(response: str, ground_truth: str) -> float:
    """1 for a response with an even number of characters, else 0."""
    return float(len(response) % 2 == 0)


def nan_reward(response: str, ground_truth: str) -> float:
    """Always NaN: drives the trainer's non-finite loss policy."""
    return float("nan")
