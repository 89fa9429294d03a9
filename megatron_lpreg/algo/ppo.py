"""PPO/GRPO clipped surrogate, clip-higher (DAPO's asymmetric clip) and dual clip.

Legend: B sequences, T tokens; every tensor argument is ``[B, T]``. Log-probs are natural-log, of the sampled token.
Reference: Schulman et al. 2017 (PPO, eq. 7); Ye et al. 2020 (dual clip); Yu et al. 2025 (DAPO clip-higher).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Surrogate:
    """Per-token pieces of the clipped surrogate, all ``[B, T]``.

    Attributes:
        loss: ``max(-A r, -A clamp(r, 1-clip_low, 1+clip_high))`` (dual-clipped for A < 0 when enabled).
        ratio: ``r = exp(clamp(logp - old_logp, -20, 20))`` (with grad; see ``aggregation.LOG_RATIO_CLAMP``).
        clipped: bool, the clamped branch is strictly larger (the token's gradient is cut).
        dual_clipped: bool, the dual-clip bound is active (A < 0 and the clipped loss exceeds ``-A c``).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
) -> Surrogate:
    """Token-level PPO clipped surrogate loss (to minimize).

    Args:
        logprobs: current policy log-probs (with grad).
        old_logprobs: behaviour-policy log-probs (detached).
        advantages: per-token advantages.
        clip_low, clip_high: ratio clipped to ``[1 - clip_low, 1 + clip_high]``.
        clip_ratio_c: dual-clip constant (> 1 enables it for A < 0, 0 disables).

    Returns:
        :class:`Surrogate`.
    """
    ratio = importance_ratio(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    dual_clipped = torch.zeros_like(clipped)
    if clip_ratio_c:
        bound = -advantages * clip_ratio_c
        negative = advantages < 0
        dual_clipped = negative & (loss > bound)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    return Surrogate(loss=loss, ratio=ratio, clipped=clipped, dual_clipped=dual_clipped)


def surrogate_metrics(
    surrogate: Surrogate, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``actor/*`` metrics: clip fractions (low side: A<0 and r<1; high side: A>0 and r>1), dual-clip fraction, and
    the k3 estimate of KL(pi_old || pi_theta) on the sampled tokens."""
    log_ratio = (logprobs - old_logprobs).detach()
    ratio = surrogate.ratio.detach()
    return {
        "actor/clipfrac": masked_mean(surrogate.clipped.float(), mask),
        "actor/clipfrac_low": masked_mean((surrogate.clipped & (ratio < 1)).float(), mask),
        "actor/clipfrac_high": masked_mean((surrogate.clipped & (ratio > 1)).float(), mask),
        "actor/dual_clipfrac": masked_mean(surrogate.dual_clipped.float(), mask),
        "actor/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
        "actor/ratio_mean": masked_mean(ratio, mask),
    }


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped policy loss; DAPO's clip-higher is ``clip_high > clip_low``.

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        clip_low, clip_high, clip_ratio_c: see :func:`clipped_surrogate`.
        loss_agg, global_valid_tokens, loss_norm_len: see :func:`megatron_lpreg.algo.aggregation.aggregate_loss`
            (``loss_norm_len`` is its ``norm_len``).

    Returns:
        ``(loss, metrics)``: 0-dim loss and ``loss/policy`` + ``actor/*`` metrics.
    """
    surrogate = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c
    )
    loss = aggregate_loss(surrogate.loss, response_mask, loss_agg, global_valid_tokens, loss_norm_len)
    metrics = surrogate_metrics(surrogate, logprobs, old_logprobs, response_mask)
    metrics["loss/policy"] = loss
    return loss, metrics_to_floats(metrics)


def ppo_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name`` ``grpo`` (symmetric clip, 0.2 by default) and ``dapo`` (clip-higher: ``clip_high > clip_low``,
    0.28 / 0.2 in DAPO): :func:`ppo_policy_loss` with the config's clip and aggregation."""
    return ppo_policy_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.response_mask,
                           clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c,
                           **inputs.aggregation(cfg))
