"""Entropy-based baselines: an entropy bonus on the PPO loss, and 80/20 (gradient only on high-entropy tokens).

Legend: B sequences, T tokens; every tensor argument is ``[B, T]``; entropy is of the full next-token distribution
(from :func:`megatron_lpreg.ops.vocab_parallel.vocab_parallel_logprob_stats`), in nats.
Reference: Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RLVR".
"""
from __future__ import annotations

import logging

import torch

from megatron_lpreg.algo.aggregation import LossAgg, aggregate_loss, masked_mean, metrics_to_floats
from megatron_lpreg.algo.inputs import PolicyLossInputs
from megatron_lpreg.algo.ppo import clipped_surrogate, surrogate_metrics
from megatron_lpreg.config.algo import AlgoConfig

logger = logging.getLogger(__name__)


def entropy_bonus_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped loss minus ``entropy_coef`` times the (same-way aggregated) entropy.

    Args:
        entropy: ``[B, T]`` per-token entropy with grad (the bonus pushes it up).
        entropy_coef: bonus weight (>= 0 raises entropy).
        other args: see :func:`megatron_lpreg.algo.ppo.ppo_policy_loss`.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``loss/entropy_bonus``, ``entropy/mean`` and ``actor/*``.
    """
    surrogate = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c
    )
    pg_loss = aggregate_loss(surrogate.loss, response_mask, loss_agg, global_valid_tokens, loss_norm_len)
    entropy_term = aggregate_loss(entropy, response_mask, loss_agg, global_valid_tokens, loss_norm_len)
    loss = pg_loss - entropy_coef * entropy_term
    metrics = surrogate_metrics(surrogate, logprobs, old_logprobs, response_mask)
    metrics.update({"loss/policy": loss, "loss/pg": pg_loss, "loss/entropy_bonus": entropy_coef * entropy_term,
                    "entropy/mean": masked_mean(entropy.detach(), response_mask)})
    return loss, metrics_to_floats(metrics)


def entropy_bonus_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=entropy``: :func:`entropy_bonus_loss`; needs ``inputs.entropy`` (with grad)."""
    return entropy_bonus_loss(inputs.logprobs, inputs.old_logprobs, inputs.require("entropy", cfg), inputs.advantages,
                              inputs.response_mask, entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, **inputs.aggregation(cfg))


def top_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool ``[B, T]``: the ``max(1, int(frac * n_valid))`` valid tokens of highest entropy (none if no valid token)."""
    valid = response_mask > 0
    n_valid = int(valid.sum())
    chosen = torch.zeros_like(valid)
    if n_valid:
        k = max(1, int(frac * n_valid))
        pool = torch.where(valid, entropy.detach(), torch.full_like(entropy, -torch.inf)).reshape(-1)
        chosen.view(-1)[torch.topk(pool, k).indices] = True
    return chosen


def forking_80_20_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    top_entropy_frac: float,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped loss kept only on the top ``top_entropy_frac`` highest-entropy valid tokens of the micro-batch.

    Normalised as the authors (their ``compute_policy_loss_8020_split`` zeroes the response mask outside the
    top tokens before aggregating): the aggregation runs over the selected tokens only, so with ``token_mean`` the
    loss is the mean over the selected tokens (not over all valid tokens, which would shrink the step by ~frac).
    ``global_token_mean`` divides by ``top_entropy_frac * global_valid_tokens`` (the batch's selected-token count
    up to per-micro-batch rounding); ``seq_mean_token_mean`` averages each row's selected tokens.

    Args:
        entropy: ``[B, T]`` per-token entropy (only its ranking is used; detached).
        top_entropy_frac: fraction of valid tokens that keep their policy gradient, in (0, 1].
        other args: see :func:`megatron_lpreg.algo.ppo.ppo_policy_loss`.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``entropy/top_threshold``, ``entropy/mean`` and ``actor/*``.
    """
    surrogate = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c
    )
    top = top_entropy_mask(entropy, response_mask, top_entropy_frac)
    selected_tokens = None if global_valid_tokens is None else top_entropy_frac * float(global_valid_tokens)
    loss = aggregate_loss(surrogate.loss, top.to(response_mask.dtype), loss_agg, selected_tokens, loss_norm_len)
    metrics = surrogate_metrics(surrogate, logprobs, old_logprobs, response_mask)
    threshold = entropy.detach()[top].min() if bool(top.any()) else torch.zeros(())
    metrics.update({"loss/policy": loss, "entropy/top_threshold": threshold,
                    "entropy/mean": masked_mean(entropy.detach(), response_mask)})
    return loss, metrics_to_floats(metrics)


def forking_80_20_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=forking_80_20``: :func:`forking_80_20_loss`; needs ``inputs.entropy`` (its ranking only)."""
    return forking_80_20_loss(inputs.logprobs, inputs.old_logprobs, inputs.require("entropy", cfg), inputs.advantages,
                              inputs.response_mask, top_entropy_frac=cfg.top_entropy_frac, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, **inputs.aggregation(cfg))
