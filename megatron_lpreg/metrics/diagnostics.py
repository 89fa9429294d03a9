"""Exploration diagnostics for any run: spark / noise token classes, decision-position probes, sampled-probability
histograms, Lp-Reg selections by token class, the share of the push-down the Lp-Reg term cancels (pass@k and avg@k
are eval's: ``megatron_lpreg.eval.scoring``; custom benchmarks are sampled with ``name@sampled=path``).

Legend: N decision positions, V vocabulary, B rows x T tokens for per-token tensors. Everything is detached
float64 arithmetic; nothing here changes training. The trainer logs the per-step ones (``diag/*``,
``entropy/first_token``) when the run config's ``diagnostics:`` names a class; docs/diagnostics.md lists the keys
and shows real-model use (spark words "wait", "however", "perhaps").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from megatron_lpreg.algo.lpreg import KL_TERM_CLAMP, _reference_selection, global_lowprob_threshold, lowprob_candidates
from megatron_lpreg.config.diagnostics import DiagnosticsConfig, TokenClasses

__all__ = [
    "CLASS_NAMES", "HISTOGRAM_EDGES", "DiagnosticsConfig", "TokenClasses", "classify_tokens", "decision_probe",
    "first_response_positions", "first_token_entropy", "kl_cancel_fraction", "lpreg_class_metrics",
    "lpreg_selection",
    "rollout_class_counts", "rollout_class_metrics", "sampled_prob_histogram", "selections_by_class",
]

CLASS_NAMES = ("other", "main", "spark", "noise")
"""Token classes, in label order (:func:`classify_tokens`)."""
HISTOGRAM_EDGES = tuple(10.0 ** e for e in range(-6, 1))
"""Probability bin edges of :func:`sampled_prob_histogram` (1e-6 .. 1, one bin per decade; below 1e-6 -> bin 0)."""


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
                    old_logprobs: torch.Tensor | None = None,
                    lowprob_threshold: float | None = None) -> torch.Tensor:
    """Bool ``[B, T]``: the tokens :func:`megatron_lpreg.algo.lpreg.lpreg_policy_loss` regularises on this
    micro-batch (its own selection rules). Global mode uses ``lowprob_threshold`` (the trainer's step-wide one)
    when given, else a single-process threshold over this micro-batch."""
    candidates = (mask > 0) & (advantages < 0)
    if selection == "reference":
        selected, _ = _reference_selection(logprobs.detach(), candidates, rho)
    else:
        old = (old_logprobs if old_logprobs is not None else logprobs).detach()
        threshold = lowprob_threshold if lowprob_threshold is not None else global_lowprob_threshold(
            [lowprob_candidates(old, advantages, mask)], rho)
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


# ---- per-step trainer metrics (``diag/*``, ``entropy/first_token``; docs/diagnostics.md) ------------------------

def first_response_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, positions)``: the rows of ``mask [B, T]`` that hold a response token and, for each, the position
    of its first one (where the first response token is predicted)."""
    has = (mask > 0).any(dim=1)
    rows = torch.nonzero(has).reshape(-1)
    return rows, (mask[rows] > 0).float().argmax(dim=1)  # argmax returns the first maximal index


def first_token_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean entropy at each row's first response position (the decision token of a strategy task); None when no
    row of ``mask`` holds a response token (pipeline filler)."""
    rows, positions = first_response_positions(mask)
    if rows.numel() == 0:
        return None
    return float(entropy.detach().double()[rows, positions].mean())


def rollout_class_counts(targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                         engine_logprobs: torch.Tensor, classes: TokenClasses,
                         edges: Sequence[float] = HISTOGRAM_EDGES) -> dict[str, float]:
    """Additive counts of one rollout batch (sum them over data-parallel ranks, then :func:`rollout_class_metrics`).

    Args:
        targets: ``[B, T]`` sampled response token at each predicting position (TrainBatch.targets).
        mask: ``[B, T]``, > 0 on response positions.
        advantages: ``[B, T]`` (the sequence advantage on its response positions).
        engine_logprobs: ``[B, T]`` the engine's sampling log-probs.
        classes: resolved spark / noise ids.

    Returns:
        ``responses``, ``response_tokens``, ``{spark,noise}_first``, ``{spark,noise}_tokens``, ``spark_negative``
        (spark tokens in A < 0 responses) and ``hist_pos_<i>`` / ``hist_neg_<i>`` (:func:`sampled_prob_histogram`).
    """
    valid = mask > 0
    rows, positions = first_response_positions(mask)
    counts = {"responses": float(rows.numel()), "response_tokens": float(valid.sum())}
    for name, ids in (("spark", classes.spark), ("noise", classes.noise)):
        members = torch.isin(targets, torch.tensor(sorted(ids), dtype=targets.dtype, device=targets.device)) \
            if ids else torch.zeros_like(valid)
        counts[f"{name}_first"] = float(members[rows, positions].sum())
        counts[f"{name}_tokens"] = float((members & valid).sum())
        if name == "spark":
            counts["spark_negative"] = float((members & valid & (advantages < 0)).sum())
    hist = sampled_prob_histogram(engine_logprobs, advantages, mask, edges)
    for sign, key in (("pos", "positive"), ("neg", "negative")):
        counts.update({f"hist_{sign}_{i}": float(c) for i, c in enumerate(hist[key])})
    return counts


def rollout_class_metrics(counts: dict[str, float]) -> dict[str, float]:
    """``diag/*`` of the step from counts summed over ranks (:func:`rollout_class_counts`): fractions of the whole
    step's responses / tokens, and the histograms as whole-step counts. A fraction with an empty denominator is 0.
    """
    def ratio(num: str, den: str) -> float:
        return counts[num] / counts[den] if counts[den] > 0 else 0.0

    out = {
        "diag/spark_first_frac": ratio("spark_first", "responses"),
        "diag/noise_first_frac": ratio("noise_first", "responses"),
        "diag/spark_token_frac": ratio("spark_tokens", "response_tokens"),
        "diag/noise_token_frac": ratio("noise_tokens", "response_tokens"),
        "diag/spark_negative_frac": ratio("spark_negative", "spark_tokens"),
    }
    out.update({f"diag/{k}": v for k, v in counts.items() if k.startswith("hist_")})
    return out


def lpreg_class_metrics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, proxy_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, classes: TokenClasses,
                        *, rho: float, beta: float, selection: Literal["reference", "global"] = "reference",
                        lowprob_threshold: float | None = None, with_kl_cancel: bool = True) -> dict[str, float]:
    """The Lp-Reg loss's own regularised tokens of one micro-batch, by class: ``diag/lpreg_selected_<class>``
    (other / main / spark / noise counts) and, when ``with_kl_cancel`` (k3 term) and any token is regularised,
    ``diag/lpreg_kl_cancel`` (:func:`kl_cancel_fraction`)."""
    regularized = lpreg_selection(logprobs, proxy_logprobs, advantages, mask, rho=rho, selection=selection,
                                  old_logprobs=old_logprobs, lowprob_threshold=lowprob_threshold)
    out = selections_by_class(regularized, targets, classes, prefix="diag/lpreg_selected")
    out = {k.replace("diag/lpreg_selected/", "diag/lpreg_selected_"): v for k, v in out.items()}
    if with_kl_cancel and bool(regularized.any()):
        out["diag/lpreg_kl_cancel"] = kl_cancel_fraction(logprobs, old_logprobs, proxy_logprobs, advantages,
                                                         regularized, beta=beta)
    return out
