"""Group-relative advantage estimators: GRPO, Dr.GRPO, RLOO.

Legend: G prompt groups, n responses per group. One scalar reward per response; the trainer broadcasts each
response's advantage to its response tokens.
References: Shao et al. 2024 (GRPO, as in the Lp-Reg authors' veRL: unbiased std, eps 1e-6); Liu et al. 2025
(Dr.GRPO: no std division); Ahmadian et al. 2024 (RLOO: leave-one-out baseline).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

GRPO_EPS = 1e-6
"""Added to the group std (the authors' value)."""


def grpo_advantages(rewards: torch.Tensor, eps: float = GRPO_EPS) -> torch.Tensor:
    """``(R - mean) / (std + eps)`` per row of ``[G, n]``, unbiased (n-1) std.

    A group of one uses mean 0 and std 1 (``A = R / (1 + eps)``); a constant group of n >= 2 gives exactly 0.
    """
    if rewards.shape[-1] == 1:
        return rewards / (1.0 + eps)
    centred = rewards - rewards.mean(-1, keepdim=True)
    advantages = centred / (rewards.std(-1, keepdim=True) + eps)
    return torch.where(_constant_rows(rewards), torch.zeros_like(advantages), advantages)


def drgrpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``R - mean`` per row of ``[G, n]`` (no std normalization); a group of one keeps ``R`` (mean 0)."""
    if rewards.shape[-1] == 1:
        return rewards.clone()
    centred = rewards - rewards.mean(-1, keepdim=True)
    return torch.where(_constant_rows(rewards), torch.zeros_like(centred), centred)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``R_i - mean_{j != i} R_j`` per row of ``[G, n]``; a group of one keeps ``R`` (baseline 0)."""
    n = rewards.shape[-1]
    if n == 1:
        return rewards.clone()
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    advantages = rewards - baseline
    return torch.where(_constant_rows(rewards), torch.zeros_like(advantages), advantages)


def _constant_rows(rewards: torch.Tensor) -> torch.Tensor:
    return (rewards == rewards[..., :1]).all(-1, keepdim=True)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
}


def compute_advantages(
    name: str, rewards: torch.Tensor | Sequence[torch.Tensor | Sequence[float]]
) -> torch.Tensor | list[torch.Tensor]:
    """Per-response advantages for each prompt group.

    Args:
        name: ``"grpo"``, ``"drgrpo"`` or ``"rloo"`` (``AlgoConfig.advantage``).
        rewards: either a float tensor ``[G, n]`` (equal-size groups), or a list of G groups, each a 1-D tensor or a
            list of floats (sizes may differ, e.g. after filtering).

    Returns:
        Same structure as the input: a ``[G, n]`` tensor, or a list of 1-D float tensors (float32 unless the input
        was float64). Constant groups of size >= 2 give exactly 0.

    Raises:
        ValueError: unknown name, a tensor that is not 2-D, or an empty group.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} unknown; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    estimator = ADVANTAGE_ESTIMATORS[name]
    if isinstance(rewards, torch.Tensor):
        if rewards.dim() != 2 or rewards.shape[-1] == 0:
            raise ValueError(f"rewards tensor must be [G, n] with n >= 1, got shape {tuple(rewards.shape)}")
        return estimator(_as_float(rewards))
    out = []
    for index, group in enumerate(rewards):
        row = _as_float(torch.as_tensor(group)).reshape(1, -1)
        if row.numel() == 0:
            raise ValueError(f"rewards group {index} is empty; drop it before computing advantages")
        out.append(estimator(row).reshape(-1))
    return out


def _as_float(rewards: torch.Tensor) -> torch.Tensor:
    return rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.to(torch.float32)
