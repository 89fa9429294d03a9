"""Float64, full-vocabulary, single-process reference of every statistic in :mod:`.vocab_parallel`.

Written for clarity, not speed: the whole vocabulary is materialized and every quantity follows its textbook
definition (and the Lp-Reg authors' order of operations for the proxy). Tests compare the fused op against it.
Legend: N leading token dims, V real vocabulary, Vp padded vocabulary (V <= Vp).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_lpreg.ops.vocab_parallel import PROXY_FILL_LOGIT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceStats:
    """Float64 reference statistics, each shaped like the tokens.

    Attributes:
        logprobs: log pi(y), pi = softmax(z / T).
        entropy: H(pi) in nats.
        proxy_logprobs: log_softmax(where(p_raw >= kappa * max p_raw, z, -1e4) / T)[y], p_raw = softmax(z).
        kl_proxy_to_policy: KL(pi_proxy || pi) over the full vocabulary.
        kl_policy_to_proxy: KL(pi || pi_proxy) over the full vocabulary.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    proxy_logprobs: torch.Tensor
    kl_proxy_to_policy: torch.Tensor
    kl_policy_to_proxy: torch.Tensor


def reference_logprob_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    kappa: float = 0.02,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> ReferenceStats:
    """All statistics of the fused op, from the full (gathered) logits, in float64.

    Differentiable w.r.t. ``logits`` (pass a float64 leaf with requires_grad for reference gradients); the proxy is
    built from detached logits, as the op treats it (it stands for pi_old).

    Args:
        logits: ``[..., Vp]`` full-vocabulary logits (any float dtype; computed in float64).
        tokens: ``[...]`` target ids in ``[0, vocab_size)``.
        kappa: min-p threshold on the un-tempered probabilities (">=", ties kept).
        temperature: sampling temperature T.
        vocab_size: real vocabulary V; columns ``>= V`` (padding) are dropped. None: all columns are real.

    Returns:
        :class:`ReferenceStats` (float64).
    """
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    z = logits[..., :vocab_size].to(torch.float64)
    index = tokens.unsqueeze(-1).long()

    log_p = torch.log_softmax(z / temperature, dim=-1)
    p = log_p.exp()
    logprobs = log_p.gather(-1, index).squeeze(-1)
    entropy = -(p * log_p).sum(-1)

    raw = z.detach()
    probs_raw = torch.softmax(raw, dim=-1)
    kept = probs_raw >= kappa * probs_raw.max(dim=-1, keepdim=True).values
    proxy_logits = torch.where(kept, raw, torch.full_like(raw, PROXY_FILL_LOGIT))
    log_q = torch.log_softmax(proxy_logits / temperature, dim=-1)
    q = log_q.exp()
    proxy_logprobs = log_q.gather(-1, index).squeeze(-1)

    return ReferenceStats(
        logprobs=logprobs,
        entropy=entropy,
        proxy_logprobs=proxy_logprobs,
        kl_proxy_to_policy=(q * (log_q - log_p)).sum(-1),
        kl_policy_to_proxy=(p * (log_p - log_q)).sum(-1),
    )
