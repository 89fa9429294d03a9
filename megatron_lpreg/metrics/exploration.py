"""Exploration and diversity metrics: token entropy, low-probability sampled tokens, self-BLEU.

Shapes: T = tokens (flattened over sequences), V = vocabulary. Masks are 1 for response tokens that count.
Keys are namespaced (``entropy/…``, ``lowprob/…``, ``diversity/…``) so the trainer can log them as they are.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

_WORDS = re.compile(r"\w+|[^\w\s]+")


def token_entropy(logits_TV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` per token, computed in float64.

    Args:
        logits_TV: [T, V] logits (any float dtype; not modified).
        temperature: sampling temperature (> 0).

    Returns:
        [T] float64 entropies.
    """
    logp = torch.log_softmax(logits_TV.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _masked(values_T: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    values = values_T.detach().double().reshape(-1)
    if mask_T is None:
        return values
    mask = mask_T.reshape(-1).bool()
    if mask.shape != values.shape:
        raise ValueError(f"mask has {mask.numel()} entries but values have {values.numel()}")
    return values[mask]


def entropy_stats(entropy_T: torch.Tensor, mask_T: torch.Tensor | None = None, *, prefix: str = "entropy"
                  ) -> dict[str, float]:
    """Summary of per-token entropies over the masked tokens.

    Args:
        entropy_T: [T] (or any shape) entropies in nats.
        mask_T: same number of entries; 1 = count the token. None = all.
        prefix: metric namespace.

    Returns:
        ``{prefix}/mean``, ``/std`` (population), ``/min``, ``/p50``, ``/p90``, ``/max``, ``/tokens``; an empty
        selection gives only ``{prefix}/tokens = 0``.
    """
    values = _masked(entropy_T, mask_T)
    if values.numel() == 0:
        return {f"{prefix}/tokens": 0.0}
    q = torch.quantile(values, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {
        f"{prefix}/mean": float(values.mean()),
        f"{prefix}/std": float(values.std(correction=0)),
        f"{prefix}/min": float(values.min()),
        f"{prefix}/p50": float(q[0]),
        f"{prefix}/p90": float(q[1]),
        f"{prefix}/max": float(values.max()),
        f"{prefix}/tokens": float(values.numel()),
    }


def low_prob_token_stats(logp_T: torch.Tensor, mask_T: torch.Tensor | None = None, *, threshold: float = 0.1,
                         prefix: str = "lowprob") -> dict[str, float]:
    """How often sampling picked a token the policy gave probability below ``threshold``, and how unlikely those were.

    Args:
        logp_T: [T] log-probabilities of the sampled tokens (engine or trainer).
        mask_T: 1 = response token that counts; None = all.
        threshold: probability below which a sampled token counts as low-probability (0 < threshold <= 1).
        prefix: metric namespace.

    Returns:
        ``{prefix}/frac`` (share of counted tokens below the threshold), ``{prefix}/mean_prob`` (their mean
        probability; 0 when there are none), ``{prefix}/count``.

    Raises:
        ValueError: threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    prob = _masked(logp_T, mask_T).exp()
    low = prob[prob < threshold]
    total = prob.numel()
    return {
        f"{prefix}/frac": low.numel() / total if total else 0.0,
        f"{prefix}/mean_prob": float(low.mean()) if low.numel() else 0.0,
        f"{prefix}/count": float(low.numel()),
    }


def words(text: str) -> list[str]:
    """Word/punctuation tokens for BLEU (a regular expression; needs no nltk data)."""
    return _WORDS.findall(text)


def self_bleu(responses: Sequence[str], *, max_n: int = 4) -> float:
    """Mean BLEU of each response against the others of the same prompt (1 = identical, lower = more diverse).

    Uses nltk's ``sentence_bleu`` with uniform weights up to ``max_n``-grams and smoothing method 1 (a zero
    n-gram count becomes 0.1), on regexp word tokens. Responses that tokenize to nothing are dropped.

    Args:
        responses: the group's responses (at least 2 non-empty).
        max_n: highest n-gram order.

    Returns:
        Self-BLEU in [0, 1].

    Raises:
        ValueError: fewer than two non-empty responses.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    tokenized = [words(r) for r in responses]
    tokenized = [t for t in tokenized if t]
    if len(tokenized) < 2:
        raise ValueError(f"self-BLEU needs at least 2 non-empty responses, got {len(tokenized)}")
    weights = tuple([1.0 / max_n] * max_n)
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu(tokenized[:i] + tokenized[i + 1:], hyp, weights=weights, smoothing_function=smooth)
        for i, hyp in enumerate(tokenized)
    ]
    return sum(scores) / len(scores)


def group_self_bleu(groups: Iterable[Sequence[str]], *, max_n: int = 4, prefix: str = "diversity") -> dict[str, float]:
    """Mean self-BLEU over prompt groups with at least two non-empty responses (others are skipped).

    Returns:
        ``{prefix}/self_bleu`` and ``{prefix}/groups`` (how many groups counted); empty dict when none did.
    """
    values = []
    for group in groups:
        if sum(1 for r in group if words(r)) >= 2:
            values.append(self_bleu(group, max_n=max_n))
    if not values:
        return {}
    return {f"{prefix}/self_bleu": sum(values) / len(values), f"{prefix}/groups": float(len(values))}


def distinct_n(responses: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique n-grams / all n-grams over ``responses`` (0 when there are none)."""
    grams: Counter[tuple[str, ...]] = Counter()
    for text in responses:
        toks = words(text)
        grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
