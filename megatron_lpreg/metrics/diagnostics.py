"""Exploration diagnostics for any run: spark / noise token classes, decision-position probes, sampled-probability
histograms, Lp-Reg selections by token class, the share of the push-down the Lp-Reg term cancels (pass@k and avg@k
are eval's: ``megatron_lpreg.eval.scoring``; custom benchmarks are sampled with ``name@sampled=path``).

Legend: N decision positions, V vocabulary, B rows x T tokens for per-token tensors. Everything is detached
float64 arithmetic; nothing here changes training. docs/study.md ("Diagnostics") shows how to use it on a real
model (spark words "wait", "however", "perhaps").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_lpreg.algo.lpreg import KL_TERM_CLAMP, _reference_selection, global_lowprob_threshold, lowprob_candidates

CLASS_NAMES = ("other", "main", "spark", "noise")
"""Token classes, in label order (:func:`classify_tokens`)."""
HISTOGRAM_EDGES = tuple(10.0 ** e for e in range(-6, 1))
"""Probability bin edges of :func:`sampled_prob_histogram` (1e-6 .. 1, one bin per decade; below 1e-6 -> bin 0)."""


@dataclass(kw_only=True)
class DiagnosticsConfig:
    """Which tokens the diagnostics follow. Ids and strings may be mixed; strings are resolved with the run's
    tokenizer by :meth:`resolve` (each string and its capitalised / space-prefixed forms that encode to one token).
    """

    spark_ids: list[int] = field(default_factory=list)
    """Token ids of the reasoning sparks (Task A: the scratchpad id)."""
    spark_strings: list[str] = field(default_factory=list)
    """Spark words for real models, e.g. ["wait", "however", "perhaps"]."""
    noise_ids: list[int] = field(default_factory=list)
    """Token ids that carry no strategy (Task A: the 100 unused ids)."""
    noise_strings: list[str] = field(default_factory=list)
    """Noise words, resolved as spark_strings."""
    main_ids: list[int] = field(default_factory=list)
    """Ids of the main (default) choice at decision positions; empty = the most likely token there."""
    kappa: float = 0.02
    """Min-p cut of the probes' "mass below the cut" (the run's algo.kappa)."""

    def validate(self) -> None:
        if not 0.0 < self.kappa <= 1.0:
            raise ValueError(f"diagnostics.kappa={self.kappa} must be in (0, 1]")
        both = set(self.spark_ids) & set(self.noise_ids)
        if both:
            raise ValueError(f"token ids {sorted(both)} are in both spark_ids and noise_ids; a token has one class")

    def resolve(self, tokenizer=None) -> TokenClasses:
        """Ids of each class (strings through ``tokenizer.encode(text, add_special_tokens=False)``).

        Raises:
            ValueError: strings without a tokenizer, or a string none of whose forms is a single token.
        """
        self.validate()
        spark = set(self.spark_ids) | _string_ids(self.spark_strings, tokenizer, "spark_strings")
        noise = set(self.noise_ids) | _string_ids(self.noise_strings, tokenizer, "noise_strings")
        return TokenClasses(spark=frozenset(spark), noise=frozenset(noise), main=frozenset(self.main_ids))


@dataclass(frozen=True)
class TokenClasses:
    """Resolved id sets (see :class:`DiagnosticsConfig`)."""

    spark: frozenset[int]
    noise: frozenset[int]
    main: frozenset[int] = frozenset()


def _string_ids(strings: Sequence[str], tokenizer, key: str) -> set[int]:
    if strings and tokenizer is None:
        raise ValueError(f"diagnostics.{key}={list(strings)} needs a tokenizer; give ids instead or pass one")
    ids: set[int] = set()
    for text in strings:
        forms = {text, " " + text, text.capitalize(), " " + text.capitalize()}
        found = {enc[0] for form in forms if len(enc := tokenizer.encode(form, add_special_tokens=False)) == 1}
        if not found:
            raise ValueError(f"diagnostics.{key}: {text!r} is not a single token in any of the forms "
                             f"{sorted(forms)}; give its id(s) in the *_ids list instead")
        ids |= found
    return ids


def classify_tokens(tokens: torch.Tensor, classes: TokenClasses) -> torch.Tensor:
    """Class label per token (index into :data:`CLASS_NAMES`; main only when ``classes.main`` is given)."""
    labels = torch.zeros(tokens.shape, dtype=torch.long)
    for index, ids in ((1, classes.main), (2, classes.spark), (3, classes.noise)):
        if ids:
            labels[torch.isin(tokens.cpu(), torch.tensor(sorted(ids)))] = index
    return labels


def decision_probe(logits_NV: torch.Tensor, classes: TokenClasses, *, kappa: float = 0.02,
                   prefix: str = "probe") -> dict[str, float]:
    """Mean over N decision positions of p(main), p(spark), p(noise), the mass below ``kappa x p_max`` and entropy.

    p(main) is the mass of ``classes.main`` or, when that is empty, the largest probability at each position.
    """
    logp = torch.log_softmax(logits_NV.detach().double(), -1)
    probs = logp.exp()
    p_max = probs.amax(-1, keepdim=True)
    main = probs[:, sorted(classes.main)].sum(-1) if classes.main else p_max.squeeze(-1)
    out = {
        f"{prefix}/p_main": main,
        f"{prefix}/p_spark": probs[:, sorted(classes.spark)].sum(-1) if classes.spark else torch.zeros_like(main),
        f"{prefix}/p_noise": probs[:, sorted(classes.noise)].sum(-1) if classes.noise else torch.zeros_like(main),
        f"{prefix}/mass_below_cut": torch.where(probs < kappa * p_max, probs, torch.zeros_like(probs)).sum(-1),
        f"{prefix}/entropy": -(probs * logp).sum(-1),
    }
    result = {key: float(value.mean()) for key, value in out.items()}
    if classes.noise:
        noise_max = probs[:, sorted(classes.noise)].amax(-1) / p_max.squeeze(-1)
        result[f"{prefix}/noise_max_rel"] = float(noise_max.max())
    return result


def sampled_prob_histogram(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           edges: Sequence[float] = HISTOGRAM_EDGES) -> dict[str, list[int]]:
    """Counts of sampled-token probabilities per bin, for positive (A > 0) and negative (A < 0) samples.

    Returns:
        ``{"edges": [...], "positive": [...], "negative": [...]}``; bin i holds ``edges[i-1] <= p < edges[i]``
        (bin 0: below ``edges[0]``; the last bin includes p = 1).
    """
    prob = logp.detach().double().exp()
    valid = mask > 0
    bounds = torch.tensor(list(edges), dtype=torch.float64)
    bins = torch.bucketize(prob, bounds, right=True).clamp(max=len(edges) - 1)
    out: dict[str, list] = {"edges": list(edges)}
    for name, sign in (("positive", advantages > 0), ("negative", advantages < 0)):
        chosen = bins[valid & sign]
        out[name] = torch.bincount(chosen.reshape(-1), minlength=len(edges)).tolist()
    return out


def lpreg_selection(logprobs: torch.Tensor, proxy_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, rho: float, selection: Literal["reference", "global"] = "reference",
                    old_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, T]``: the tokens :func:`megatron_lpreg.algo.lpreg.lpreg_policy_loss` regularises on this
    micro-batch (its own selection rules; global mode with a single-process threshold over this micro-batch)."""
    candidates = (mask > 0) & (advantages < 0)
    if selection == "reference":
        selected, _ = _reference_selection(logprobs.detach(), candidates, rho)
    else:
        old = (old_logprobs if old_logprobs is not None else logprobs).detach()
        threshold = global_lowprob_threshold([lowprob_candidates(old, advantages, mask)], rho)
        selected = candidates & (old <= threshold)
    return selected & (logprobs.detach() < proxy_logprobs)


def selections_by_class(regularized: torch.Tensor, tokens: torch.Tensor, classes: TokenClasses,
                        prefix: str = "lpreg_class") -> dict[str, float]:
    """Number of regularised tokens of each class (``{prefix}/{other,main,spark,noise}``)."""
    labels = classify_tokens(tokens, classes)[regularized.cpu()]
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES))
    return {f"{prefix}/{name}": float(count) for name, count in zip(CLASS_NAMES, counts.tolist())}


def kl_cancel_fraction(logprobs: torch.Tensor, old_logprobs: torch.Tensor, proxy_logprobs: torch.Tensor,
                       advantages: torch.Tensor, regularized: torch.Tensor, *, beta: float = 1.0) -> float:
    """Share of the policy-gradient push-down on regularised tokens that the k3 term cancels.

    Per regularised token the loss is ``-A r + beta * clamp(exp(d) - d - 1, -10, 10)``, ``d = proxy - lp``; its
    gradient w.r.t. ``lp`` is ``-A r`` (push-down, > 0 for A < 0) plus ``beta (1 - exp(d))`` (< 0 for lp < proxy; 0
    where the clamp holds). Returns ``sum(-beta (1 - exp(d))) / sum(-A r)`` over the regularised tokens (1 = the
    push-down is fully cancelled, > 1 = the spark is pushed up); 0 when none is regularised. On-policy
    (``lp = old``) one token gives ``m / (1 - m)``, m the mass the proxy filtered there.
    """
    if not bool(regularized.any()):
        return 0.0
    lp, old, proxy = (t.detach().double()[regularized] for t in (logprobs, old_logprobs, proxy_logprobs))
    adv = advantages.detach().double()[regularized]
    d = proxy - lp
    term = torch.exp(d) - d - 1.0
    kl_grad = torch.where(term.abs() <= KL_TERM_CLAMP, beta * (1.0 - torch.exp(d)), torch.zeros_like(d))
    push = -adv * torch.exp(lp - old)
    return float((-kl_grad).sum() / push.sum().clamp(min=1e-300))
