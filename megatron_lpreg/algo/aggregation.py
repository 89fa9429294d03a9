"""Loss aggregation over tokens and the small masked reductions every policy loss shares.

Legend: B sequences (rows) of a micro-batch, T token positions; ``mask`` is ``[B, T]`` with 1 on response tokens.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch

logger = logging.getLogger(__name__)

LossAgg = Literal["token_mean", "seq_mean_token_mean", "global_token_mean", "seq_mean_token_sum_norm"]

LOG_RATIO_CLAMP = 20.0
"""Every log importance ratio is clamped to [-20, 20] before ``exp`` (as verl's core_algos): in float32 an
unclamped log-ratio above ~88.7 overflows to inf and, even on a masked-out padded token, ``inf * 0`` puts NaN into
the gradient. Beyond the clamp the token's ratio is constant (no gradient); ``exp(20) ~ 4.9e8`` is far outside any
PPO clip range, so only tokens the loss already treats as off-policy are affected."""


def importance_ratio(log_ratio: torch.Tensor, *, max_log: float = LOG_RATIO_CLAMP) -> torch.Tensor:
    """``exp(clamp(log_ratio, -LOG_RATIO_CLAMP, max_log))``: the one place a ratio is exponentiated."""
    return torch.exp(torch.clamp(log_ratio, min=-LOG_RATIO_CLAMP, max=max_log))


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(values * mask)`` as a 0-dim tensor (masked-out entries may be inf/nan: they are zeroed, not multiplied)."""
    return torch.where(mask > 0, values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask > 0``; 0 when the mask is empty."""
    return masked_sum(values, mask) / (mask > 0).sum().clamp(min=1)


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg = "token_mean",
    global_valid_tokens: float | int | torch.Tensor | None = None,
    norm_len: int = 0,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    Args:
        token_loss: ``[B, T]`` loss per token.
        mask: ``[B, T]`` response mask (>0 = counted).
        mode: ``token_mean``: sum / number of valid tokens of this micro-batch (the Lp-Reg authors' choice, 0 for an
            empty micro-batch). ``seq_mean_token_mean``: mean over rows with at least one valid token of each row's
            token mean. ``global_token_mean``: sum / ``global_valid_tokens``, the valid-token count of the whole
            gradient-accumulation batch (length-unbiased; summing the micro-batch losses gives the batch token mean).
            If that count spans data-parallel ranks too, the gradient all-reduce must sum rather than average.
            ``seq_mean_token_sum_norm`` (Dr.GRPO): each row's token *sum* divided by the constant ``norm_len``,
            averaged over rows with at least one valid token, i.e. ``sum(loss) / (n_rows * norm_len)``: no
            per-response length normalisation, so long and short responses weigh the same per token. (verl's
            ``seq-mean-token-sum-norm`` divides the sum by the padded width ``T`` only and leaves the row count to
            its micro-batch scaling; here the row mean is explicit and ``norm_len`` does not depend on padding.)
        global_valid_tokens: required for ``global_token_mean``; ignored otherwise.
        norm_len: required (> 0) for ``seq_mean_token_sum_norm``: the constant length, e.g. the response budget.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: unknown mode, or ``global_token_mean`` without a positive ``global_valid_tokens``.
    """
    if mode == "token_mean":
        return masked_mean(token_loss, mask)
    if mode == "seq_mean_token_mean":
        valid = mask > 0
        row_counts = valid.sum(-1)
        row_sums = torch.where(valid, token_loss, torch.zeros_like(token_loss)).sum(-1)
        rows = row_counts > 0
        return (row_sums[rows] / row_counts[rows]).sum() / rows.sum().clamp(min=1)
    if mode == "global_token_mean":
        if global_valid_tokens is None or float(global_valid_tokens) <= 0:
            raise ValueError(
                f"loss_agg=global_token_mean needs global_valid_tokens > 0 (got {global_valid_tokens}); pass the "
                "valid-token count of the whole gradient-accumulation batch"
            )
        return masked_sum(token_loss, mask) / global_valid_tokens
    if mode == "seq_mean_token_sum_norm":
        if norm_len <= 0:
            raise ValueError(f"loss_agg=seq_mean_token_sum_norm needs norm_len > 0 (got {norm_len}); set "
                             "algo.loss_norm_len, e.g. to rollout.max_new_tokens")
        rows = ((mask > 0).sum(-1) > 0).sum().clamp(min=1)
        return masked_sum(token_loss, mask) / (rows * float(norm_len))
    raise ValueError(f"loss_agg={mode!r}; use token_mean, seq_mean_token_mean, global_token_mean or "
                     "seq_mean_token_sum_norm")


def metrics_to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Turn a dict of 0-dim tensors into floats with one device sync (one ``tolist``) instead of one per metric."""
    keys = [key for key, value in metrics.items() if isinstance(value, torch.Tensor)]
    out = {key: float(value) for key, value in metrics.items() if not isinstance(value, torch.Tensor)}
    if keys:
        stacked = torch.stack([metrics[key].detach().to(torch.float64).reshape(()) for key in keys])
        out.update(zip(keys, stacked.cpu().tolist()))
    return out
