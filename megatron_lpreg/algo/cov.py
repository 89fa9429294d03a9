"""Covariance-based entropy controls: Clip-Cov and KL-Cov.

Legend: B sequences, T tokens; every tensor argument is ``[B, T]``. The per-token "covariance" is
``(A - mean A) * (logp - mean logp)`` over the micro-batch's valid tokens (detached); tokens with a large value are
the ones whose update collapses entropy.
Reference: Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (sec. 4).
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
from megatron_lpreg.algo.ppo import clipped_surrogate, surrogate_metrics
from megatron_lpreg.config.algo import AlgoConfig

logger = logging.getLogger(__name__)


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` detached centred product ``(A - mean A)(logp - mean logp)``, means over valid tokens."""
    logp = logprobs.detach()
    return (advantages - masked_mean(advantages, response_mask)) * (logp - masked_mean(logp, response_mask))


def clip_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_cov_ratio: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    clip_low: float,
    clip_high: float,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-Cov: PPO clipped loss with the gradient removed from a few random high-covariance tokens.

    Among valid tokens not already clipped by PPO whose covariance lies strictly in ``(clip_cov_lb, clip_cov_ub)``,
    ``max(1, int(clip_cov_ratio * n_valid))`` are drawn uniformly at random (``generator``) and their loss is zeroed.

    Args:
        clip_cov_ratio, clip_cov_lb, clip_cov_ub: see above (paper: 2e-4, 1, 5).
        generator: RNG for the random draw (pass one seeded from cfg.seed for reproducibility; None = global RNG).
        other args: see :func:`megatron_lpreg.algo.ppo.ppo_policy_loss`.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``actor/cov_detached_frac`` and ``actor/*``.
    """
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high)
    valid = response_mask > 0
    cov = token_covariance(logprobs, advantages, response_mask)
    eligible = valid & ~surrogate.clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    eligible_idx = eligible.reshape(-1).nonzero().squeeze(-1)
    n_detach = min(max(1, int(clip_cov_ratio * int(valid.sum()))), eligible_idx.numel())
    detached = torch.zeros_like(valid)
    if n_detach:
        pick = torch.randperm(eligible_idx.numel(), generator=generator)[:n_detach].to(eligible_idx.device)
        detached.view(-1)[eligible_idx[pick]] = True
    token_loss = torch.where(detached, torch.zeros_like(surrogate.loss), surrogate.loss)
    loss = aggregate_loss(token_loss, response_mask, loss_agg, global_valid_tokens, loss_norm_len)
    metrics = surrogate_metrics(surrogate, logprobs, old_logprobs, response_mask)
    metrics.update({"loss/policy": loss, "actor/cov_detached_frac": masked_mean(detached.float(), response_mask)})
    return loss, metrics_to_floats(metrics)


def clip_cov_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=clip_cov``: :func:`clip_cov_loss`, drawing with ``inputs.generator``."""
    return clip_cov_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.response_mask,
                         clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub,
                         clip_low=cfg.clip_low, clip_high=cfg.clip_high, generator=inputs.generator,
                         **inputs.aggregation(cfg))


def kl_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_cov_ratio: float,
    kl_cov_coef: float,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-Cov: unclipped policy gradient ``-A r``; the top ``max(1, int(kl_cov_ratio * n_valid))`` valid tokens by
    covariance get ``+ kl_cov_coef * |logp - old_logp|`` added (none without valid tokens or with ratio 0). The
    floor of one token is verl's and the KL-Cov authors' (``max(1, int(n * k / 100))`` with k in percent).

    Args:
        kl_cov_ratio, kl_cov_coef: fraction of penalized tokens and penalty weight (paper: 2e-3, 1).
        other args: see :func:`megatron_lpreg.algo.ppo.ppo_policy_loss`.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``actor/kl_cov_frac`` and ``actor/approx_kl``.
    """
    valid = response_mask > 0
    ratio = importance_ratio(logprobs - old_logprobs)
    token_loss = -advantages * ratio
    cov = token_covariance(logprobs, advantages, response_mask)
    n_valid = int(valid.sum())
    k = max(1, int(kl_cov_ratio * n_valid)) if n_valid and kl_cov_ratio > 0 else 0
    penalized = torch.zeros_like(valid)
    if k:
        pool = torch.where(valid, cov, torch.full_like(cov, -torch.inf)).reshape(-1)
        penalized.view(-1)[torch.topk(pool, k).indices] = True
    token_loss = torch.where(penalized, token_loss + kl_cov_coef * (logprobs - old_logprobs).abs(), token_loss)
    loss = aggregate_loss(token_loss, response_mask, loss_agg, global_valid_tokens, loss_norm_len)
    log_ratio = (logprobs - old_logprobs).detach()
    metrics = {
        "loss/policy": loss,
        "actor/kl_cov_frac": masked_mean(penalized.float(), response_mask),
        "actor/approx_kl": masked_mean(ratio.detach() - 1.0 - log_ratio, response_mask),
    }
    return loss, metrics_to_floats(metrics)


def kl_cov_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=kl_cov``: :func:`kl_cov_loss`."""
    return kl_cov_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.response_mask,
                       kl_cov_ratio=cfg.kl_cov_ratio, kl_cov_coef=cfg.kl_cov_coef, **inputs.aggregation(cfg))
