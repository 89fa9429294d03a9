"""Sampling shared by the engines: request rows, per-row seeds and parameter checks (every engine); logit filters,
seeded per-row draws and sampling log-probs (the in-process engine).

Shapes: B rows (one row = one (prompt, sample) pair), V vocabulary (already sliced to the real vocab).

Reproducibility: each row owns a ``torch.Generator`` seeded from ``(seed, prompt_index, sample_index)`` and draws
exactly one uniform number per decoding step, so a row's random stream does not depend on which other rows share
its batch. Sampling is inverse-CDF on float64 probabilities, so two processes that hold bit-identical logits (e.g.
every TP rank after the logits all-gather) draw bit-identical tokens.

Log-prob convention (the one SGLang 0.5 reports by default): ``log_softmax(logits / temperature)``, i.e. after
temperature and *before* top-k/top-p/min-p truncation, so the trainer can recompute it from its own logits.
Greedy rows (``top_k == 1`` or ``temperature == 0``) report ``log_softmax(logits)``.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

import torch

from megatron_lpreg.rollout.base import SamplingParams

logger = logging.getLogger(__name__)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for response ``sample_index`` of prompt ``prompt_index`` derived from the request seed.

    Args:
        seed: the request's base seed (``SamplingParams.seed``).
        prompt_index: index of the prompt in the request.
        sample_index: 0..n-1 within the prompt's group.

    Returns:
        A non-negative int usable by ``torch.Generator.manual_seed`` and SGLang's ``sampling_seed``.
    """
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rows(num_prompts: int, n: int) -> list[tuple[int, int]]:
    """``(prompt_index, sample_index)`` of every response of a request, in the order ``generate`` returns them."""
    return [(i, j) for i in range(num_prompts) for j in range(n)]


def request_seed(params: SamplingParams) -> int:
    """The request's base seed: ``params.seed`` or a fresh random one when it is None."""
    return params.seed if params.seed is not None else secrets.randbits(62)


def validate_params(params: SamplingParams) -> None:
    """Raise ValueError naming the field when sampling parameters are out of range."""
    if params.n < 1:
        raise ValueError(f"SamplingParams.n={params.n} must be >= 1")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature={params.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"SamplingParams.top_p={params.top_p} must be in (0, 1]")
    if params.top_k == 0 or params.top_k < -1:
        raise ValueError(f"SamplingParams.top_k={params.top_k} must be -1 (off) or >= 1")
    if not 0.0 <= params.min_p < 1.0:
        raise ValueError(f"SamplingParams.min_p={params.min_p} must be in [0, 1)")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens={params.max_new_tokens} must be >= 1")


def is_greedy(params: SamplingParams) -> bool:
    return params.top_k == 1 or params.temperature == 0.0


def filtered_probs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The truncated, renormalised sampling distribution in float64.

    Order (as in SGLang/vLLM): temperature, then top-k, top-p (smallest set whose mass reaches top_p, the token
    that crosses the threshold included), min-p (drop tokens with prob < min_p * max prob); renormalise.

    Args:
        logits_BV: [B, V] raw logits (any float dtype); not modified.
        params: sampling parameters (temperature > 0).

    Returns:
        [B, V] float64 probabilities, zero outside the kept set, rows summing to 1.
    """
    probs = torch.softmax(logits_BV.double() / params.temperature, dim=-1)
    vocab = probs.shape[-1]
    if 1 <= params.top_k < vocab:
        kth = torch.topk(probs, params.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        total = sorted_probs.sum(dim=-1, keepdim=True)
        keep_sorted = mass_before < params.top_p * total
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    if params.min_p > 0.0:
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True)


@dataclass
class RowSampler:
    """Samples one token per row per step from per-row seeded generators."""

    params: SamplingParams
    generators: list[torch.Generator]

    @classmethod
    def create(cls, params: SamplingParams, seeds: list[int]) -> RowSampler:
        """One CPU generator per row, seeded with ``seeds[row]`` (see :func:`row_seed`)."""
        validate_params(params)
        generators = []
        for seed in seeds:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            generators.append(gen)
        return cls(params=params, generators=generators)

    def sample(self, logits_BV: torch.Tensor, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next token of each row.

        Args:
            logits_BV: [B, V] logits over the real vocabulary (padded entries already removed).
            rows: which generator each logits row uses (default: 0..B-1).

        Returns:
            (token_ids [B] int64, logprobs [B] float64): the sampled tokens and their log-probs under
            ``log_softmax(logits / temperature)`` (see module docstring).
        """
        rows = list(range(logits_BV.shape[0])) if rows is None else rows
        logits64 = logits_BV.double()
        if is_greedy(self.params):
            token_ids = torch.argmax(logits64, dim=-1)
            logprobs = torch.log_softmax(logits64, dim=-1).gather(-1, token_ids[:, None]).squeeze(-1)
            return token_ids, logprobs
        probs = filtered_probs(logits64, self.params)
        # one uniform per row from that row's own stream: independent of batch composition
        uniforms = torch.stack([torch.rand((), generator=self.generators[r], dtype=torch.float64, device="cpu")
                                for r in rows]).to(logits64.device)  # CPU streams: identical on every device
        cdf = torch.cumsum(probs, dim=-1)
        token_ids = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(-1)
        token_ids = token_ids.clamp(max=probs.shape[-1] - 1)
        # searchsorted can land on a zero-probability id only through float ties at the cdf edge; step back
        token_ids = _nearest_kept(probs, token_ids)
        logprobs = torch.log_softmax(logits64 / self.params.temperature, dim=-1)
        return token_ids, logprobs.gather(-1, token_ids[:, None]).squeeze(-1)


def _nearest_kept(probs_BV: torch.Tensor, token_ids_B: torch.Tensor) -> torch.Tensor:
    """Replace ids whose probability is zero by the closest lower id with positive probability."""
    chosen = probs_BV.gather(-1, token_ids_B[:, None]).squeeze(-1)
    if bool((chosen > 0).all()):
        return token_ids_B
    fixed = token_ids_B.clone()
    for row in torch.nonzero(chosen <= 0).flatten().tolist():
        kept = torch.nonzero(probs_BV[row, : int(token_ids_B[row]) + 1] > 0).flatten()
        fixed[row] = kept[-1] if kept.numel() else torch.argmax(probs_BV[row])
    return fixed
