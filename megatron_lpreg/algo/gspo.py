"""GSPO: group sequence policy optimization (sequence-level importance ratio, clipped per sequence).

Legend: B sequences, T tokens; every tensor argument is ``[B, T]``.
Reference: Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO-token form, eq. 13): the token ratio is
``sg[s_i] * pi(y_t) / sg[pi(y_t)]`` with ``s_i = exp(mean_t log(pi / pi_old))`` over the sequence's valid tokens.
"""
from __future__ import annotations

import logging

import torch

from megatron_lpreg.algo.aggregation import (
    LossAgg,
    aggregate_loss,
    importance_ratio,
    masked_mean,
    metrics_to_floats,
)
from megatron_lpreg.algo.inputs import PolicyLossInputs
from megatron_lpreg.config.algo import AlgoConfig

logger = logging.getLogger(__name__)

MAX_LOG_SEQ_RATIO = 10.0
"""Upper clamp of the log token ratio (verl's GSPO); the lower clamp is the common -LOG_RATIO_CLAMP = -20."""

GSPO_LOSS_AGG = "seq_mean_token_mean"
"""GSPO's objective is sequence-level: the mean over sequences of each sequence's token mean (verl hard-codes it)."""


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    loss_agg: LossAgg = GSPO_LOSS_AGG,
    global_valid_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss ``max(-A s, -A clamp(s, 1 - clip_low, 1 + clip_high))`` with the sequence-level ratio s.

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        clip_low, clip_high: sequence-ratio clip (the paper: 3e-4 / 4e-4).
        loss_agg: must be ``seq_mean_token_mean`` (GSPO is sequence-level; the config refuses another).
        global_valid_tokens: unused (kept for the common loss signature).

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``actor/clipfrac`` (token share in clipped sequences),
        ``actor/seq_ratio_mean`` and ``actor/approx_kl`` (k3 on tokens).
    """
    if loss_agg != GSPO_LOSS_AGG:
        raise ValueError(f"GSPO is sequence-level: loss_agg must be {GSPO_LOSS_AGG!r}, got {loss_agg!r}")
    valid = response_mask > 0
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    seq_log_ratio = log_ratio.sum(-1) / valid.sum(-1).clamp(min=1)
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = importance_ratio(token_log_ratio, max_log=MAX_LOG_SEQ_RATIO)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped_loss)
    loss = aggregate_loss(token_loss, response_mask, GSPO_LOSS_AGG)
    plain = (logprobs - old_logprobs).detach()
    metrics = {
        "loss/policy": loss,
        "actor/clipfrac": masked_mean((clipped_loss > unclipped).float(), response_mask),
        "actor/seq_ratio_mean": masked_mean(ratio.detach(), response_mask),
        "actor/approx_kl": masked_mean(importance_ratio(plain) - 1.0 - plain, response_mask),
    }
    return loss, metrics_to_floats(metrics)


def gspo_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=gspo``: :func:`gspo_policy_loss` with ``gspo_clip_low``/``gspo_clip_high`` (the config's
    ``validate()`` requires the sequence-level ``loss_agg``)."""
    return gspo_policy_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.response_mask,
                            clip_low=cfg.gspo_clip_low, clip_high=cfg.gspo_clip_high, loss_agg=cfg.loss_agg)
