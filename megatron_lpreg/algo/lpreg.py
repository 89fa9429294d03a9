"""Lp-Reg: low-probability token regularization towards a min-p filtered proxy of the old policy.

Legend: B sequences, T tokens, V vocabulary; per-token tensors are ``[B, T]``.
Reference: the Lp-Reg paper and the authors' veRL fork (CarlanLark/Lp-Reg-dev @33b27e2), as pinned down in
docs/algorithms.md. ``selection="reference"`` reproduces the authors' code step by step;
``selection="global"`` is the paper's reading (percentile over the whole global batch).
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.distributed as dist

from megatron_lpreg.algo.aggregation import LossAgg, aggregate_loss, masked_mean, metrics_to_floats
from megatron_lpreg.algo.inputs import PolicyLossInputs
from megatron_lpreg.algo.ppo import clipped_surrogate, surrogate_metrics
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.ops.vocab_parallel import PROXY_FILL_LOGIT
from megatron_lpreg.parallel import collectives as coll

logger = logging.getLogger(__name__)

KL_TERM_CLAMP = 10.0
"""The authors clamp the k3 term ``exp(d) - d - 1`` to [-10, 10]."""
# exp(d) - d - 1 exceeds KL_TERM_CLAMP for d > ~2.61 and d < -11, where value and gradient are flat. Clamping d to
# +-50 first changes neither but keeps exp() finite in fp32, so no inf*0 = nan reaches the gradient.
_D_SAFE = 50.0

PROXY_KL_DIRECTIONS = {"exact_proxy_to_policy": "proxy_to_policy", "exact_policy_to_proxy": "policy_to_proxy"}
"""``algo.proxy_kl`` -> the op's ``proxy_kl_direction`` for the exact KL (``k3`` is absent: no exact KL needed)."""


def compute_proxy_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, kappa: float = 0.02, temperature: float = 1.0
) -> torch.Tensor:
    """Proxy log-prob of the sampled tokens from full-vocabulary logits, single process (the authors' steps).

    Keep ``v`` when ``softmax(z)_v >= kappa * max softmax(z)`` (">=", ties kept), overwrite the others with -1e4,
    divide by the temperature, log-softmax, gather. For the tensor-parallel path use
    :func:`megatron_lpreg.ops.vocab_parallel.vocab_parallel_logprob_stats` (same values).

    Args:
        logits: ``[B, T, V]`` raw logits of the old-policy forward (any float dtype; computed in fp32 or wider).
        tokens: ``[B, T]`` sampled token ids.
        kappa: min-p threshold in (0, 1].
        temperature: rollout temperature (> 0).

    Returns:
        ``[B, T]`` detached proxy log-probs (about ``-1e4 - logsumexp(kept)`` for filtered tokens).

    Raises:
        ValueError: kappa outside (0, 1] or temperature <= 0.
    """
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa={kappa} must be in (0, 1]; the authors use 0.02")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature} must be > 0")
    with torch.no_grad():
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(z, dim=-1)
        kept = probs >= kappa * probs.amax(dim=-1, keepdim=True)
        filled = torch.where(kept, z, torch.full_like(z, PROXY_FILL_LOGIT)) / temperature
        return torch.log_softmax(filled, dim=-1).gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)


def lowprob_candidates(
    logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """The detached log-probs of Lp-Reg candidates (valid tokens with A < 0 strictly), flattened ``[n]``."""
    return logprobs.detach()[(response_mask > 0) & (advantages < 0)]


def global_lowprob_threshold(
    candidate_logprobs: list[torch.Tensor],
    rho: float,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> float:
    """The k-th lowest candidate log-prob over every micro-batch of every rank in ``group`` (global selection).

    Call it once per optimizer step, before the micro-batch loop, with :func:`lowprob_candidates` of each local
    micro-batch (from the detached log-probs that :func:`lpreg_policy_loss` compares in global mode:
    ``old_logprobs``). ``k = max(1, int(n_total * rho))`` as in the reference rule; each rank sends only its local
    bottom-k (padded with +inf), never all candidates: one SUM all-reduce of the count, one all-gather of k values.

    Args:
        candidate_logprobs: this rank's candidate log-probs, one 1-D tensor per micro-batch (may be empty).
        rho: fraction of candidates to regularize, in [0, 1].
        group: data-parallel group; None = default group (or a single process when not initialized).
        device: device for the collectives when ``candidate_logprobs`` is empty (default: first tensor's, else cpu).

    Returns:
        The threshold: select candidates with ``logprob <= threshold``. ``-inf`` when ``k <= 1`` (no regularization,
        the reference rule). Ties at the threshold can select a few more than k tokens.

    Raises:
        ValueError: rho outside [0, 1].
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1]")
    if device is None:
        device = candidate_logprobs[0].device if candidate_logprobs else torch.device("cpu")
    flat = [c.detach().reshape(-1).to(device=device, dtype=torch.float32) for c in candidate_logprobs]
    local = torch.cat(flat) if flat else torch.zeros(0, device=device)
    distributed = coll.world_size(group) > 1
    count = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    if distributed:
        coll.all_reduce(count, op="sum", group=group)
    k = max(1, int(int(count.item()) * rho))
    if k <= 1:
        return -math.inf
    bottom = torch.full((k,), math.inf, device=device)
    local_k = min(k, local.numel())
    if local_k:
        bottom[:local_k] = torch.topk(local, local_k, largest=False).values
    if distributed:
        bottom = coll.all_gather_into_tensor(torch.empty(coll.world_size(group) * k, device=device), bottom,
                                             group=group)
    return float(torch.kthvalue(bottom.cpu(), k).values)


def _reference_selection(
    logprobs: torch.Tensor, candidates: torch.Tensor, rho: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The authors' per-micro-batch pick: the k lowest current log-probs among candidates, only when k > 1."""
    n_candidates = int(candidates.sum())
    k = max(1, int(n_candidates * rho))
    selected = torch.zeros_like(candidates)
    if k > 1:
        pool = torch.where(candidates, logprobs.detach(), torch.full_like(logprobs, math.inf)).reshape(-1)
        selected.view(-1)[torch.topk(pool, k, largest=False).indices] = True
    return selected, {"lpreg/k": float(k if k > 1 else 0), "lpreg/num_candidates": float(n_candidates)}


def lpreg_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    proxy_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rho: float,
    beta: float = 1.0,
    clip_low: float,
    clip_high: float,
    selection: Literal["reference", "global"] = "reference",
    lowprob_threshold: float | None = None,
    proxy_kl: torch.Tensor | None = None,
    loss_agg: LossAgg = "token_mean",
    global_valid_tokens: float | None = None,
    loss_norm_len: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Lp-Reg policy loss of one micro-batch.

    Steps (reference mode = the authors' code): clipped surrogate ``max(-A r, -A clamp(r, 1-clip_low, 1+clip_high))``
    on every token (no dual clip); candidates = valid tokens with A < 0; ``k = max(1, int(n * rho))``; if k > 1 the
    k candidates with the lowest current log-prob are selected; those with ``logprob < proxy`` strictly are
    regularized: their surrogate is replaced by ``-A r + beta * clamp(exp(d) - d - 1, -10, 10)``, ``d = proxy -
    logprob``, r unclipped; then token mean.

    Global mode: candidates with ``old_logprobs <= lowprob_threshold`` (from :func:`global_lowprob_threshold`) are
    selected, so the pick is fixed for the whole step and spans DP ranks and micro-batches; if ``proxy_kl`` is given
    (the op's exact full-vocabulary KL, with grad) it replaces the sampled-token k3 term, unclamped.

    Args:
        logprobs: ``[B, T]`` current log-probs (with grad).
        old_logprobs: ``[B, T]`` behaviour-policy log-probs (detached).
        proxy_logprobs: ``[B, T]`` proxy log-probs (detached), e.g. from :func:`compute_proxy_logprobs`.
        advantages: ``[B, T]``.
        response_mask: ``[B, T]``, > 0 on tokens that count.
        rho: fraction of candidates selected, in [0, 1].
        beta: regularizer weight.
        clip_low, clip_high: ratio clip (the authors use 1.0 / 9.0).
        selection: ``"reference"`` or ``"global"``.
        lowprob_threshold: required in global mode.
        proxy_kl: optional ``[B, T]`` exact proxy-KL per token (global mode only).
        loss_agg, global_valid_tokens, loss_norm_len: see :func:`megatron_lpreg.algo.aggregation.aggregate_loss`
            (``loss_norm_len`` is its ``norm_len``).

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``actor/*`` and ``lpreg/*`` (num_candidates, k, num_selected,
        num_regularized, reg_prob_mean, reg_term_mean, selected_frac) metrics.

    Raises:
        ValueError: unknown selection, global mode without a threshold, or proxy_kl in reference mode.
    """
    if selection not in ("reference", "global"):
        raise ValueError(f"selection={selection!r}; use 'reference' or 'global'")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1]")
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high)
    candidates = (response_mask > 0) & (advantages < 0)
    if selection == "reference":
        if proxy_kl is not None:
            raise ValueError("proxy_kl (exact KL) needs selection='global'; reference mode is the authors' k3 term")
        selected, selection_metrics = _reference_selection(logprobs, candidates, rho)
    else:
        if lowprob_threshold is None:
            raise ValueError("selection='global' needs lowprob_threshold (call global_lowprob_threshold first)")
        selected = candidates & (old_logprobs.detach() <= lowprob_threshold)
        selection_metrics = {"lpreg/num_candidates": candidates.sum()}
        if math.isfinite(lowprob_threshold):  # -inf = nothing selected this step; the trainer skips steps whose
            selection_metrics["lpreg/threshold"] = float(lowprob_threshold)  # metrics are not finite
    regularized = selected & (logprobs.detach() < proxy_logprobs)

    if proxy_kl is None:
        d = torch.clamp(proxy_logprobs - logprobs, -_D_SAFE, _D_SAFE)
        reg_term = torch.clamp(torch.exp(d) - d - 1.0, -KL_TERM_CLAMP, KL_TERM_CLAMP)
    else:
        reg_term = proxy_kl
    token_loss = torch.where(regularized, -advantages * surrogate.ratio + beta * reg_term, surrogate.loss)
    loss = aggregate_loss(token_loss, response_mask, loss_agg, global_valid_tokens, loss_norm_len)

    metrics: dict = surrogate_metrics(surrogate, logprobs, old_logprobs, response_mask)
    n_regularized = regularized.sum()
    metrics.update(selection_metrics)
    metrics.update({
        "loss/policy": loss,
        "lpreg/num_selected": selected.sum(),
        "lpreg/num_regularized": n_regularized,
        "lpreg/selected_frac": masked_mean(selected.float(), response_mask),
        "lpreg/reg_prob_mean": masked_mean(logprobs.detach().exp(), regularized),
        "lpreg/reg_term_mean": masked_mean(reg_term.detach(), regularized),
    })
    return loss, metrics_to_floats(metrics)


def lpreg_from_inputs(inputs: PolicyLossInputs, cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``algo.name=lpreg``: :func:`lpreg_policy_loss` with the config's hyper-parameters.

    Needs ``inputs.proxy_logprobs``; in global selection also ``inputs.lowprob_threshold``, and ``inputs.proxy_kl``
    when ``cfg.proxy_kl`` asks for the exact KL (a given ``proxy_kl`` is ignored under ``k3``).
    """
    global_mode = cfg.selection == "global"
    return lpreg_policy_loss(
        inputs.logprobs, inputs.old_logprobs, inputs.require("proxy_logprobs", cfg), inputs.advantages,
        inputs.response_mask, rho=cfg.rho, beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        selection=cfg.selection,
        lowprob_threshold=inputs.require("lowprob_threshold", cfg) if global_mode else None,
        proxy_kl=inputs.require("proxy_kl", cfg) if cfg.proxy_kl in PROXY_KL_DIRECTIONS else None,
        **inputs.aggregation(cfg),
    )
