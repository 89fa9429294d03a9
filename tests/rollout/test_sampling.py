"""Sampling filters, per-row seeding and the log-prob convention, against hand-derived distributions."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.rollout.sampling import RowSampler, filtered_probs, row_seed, validate_params

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]], dtype=torch.float64)
EXACT = 1e-12
"""float64 softmax of log-probs reproduces them to rounding."""


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, PROBS),
        ({"top_k": 2}, [0.625, 0.375, 0, 0]),
        ({"top_p": 0.7}, [0.625, 0.375, 0, 0]),
        ({"top_p": 0.79}, [0.625, 0.375, 0, 0]),  # mass before token 2 is 0.8 >= 0.79: token 2 not needed
        ({"top_p": 0.81}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        ({"min_p": 0.4}, [0.625, 0.375, 0, 0]),  # threshold 0.4 * 0.5 = 0.2
        ({"min_p": 0.25}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # threshold 0.125
        ({"temperature": 2.0}, [math.sqrt(p) / sum(math.sqrt(q) for q in PROBS) for p in PROBS]),
        ({"top_k": 3, "top_p": 0.6}, [0.625, 0.375, 0, 0]),
    ],
)
def test_filtered_probs_hand_derived(kwargs, expected):
    probs = filtered_probs(LOGITS, SamplingParams(**kwargs))
    assert torch.allclose(probs, torch.tensor([expected], dtype=torch.float64), atol=1e-9, rtol=0)


def test_filtered_probs_does_not_modify_logits():
    logits = LOGITS.clone()
    filtered_probs(logits, SamplingParams(temperature=0.5, top_k=2))
    assert torch.equal(logits, LOGITS)


def test_sample_frequencies_follow_filtered_distribution():
    params = SamplingParams(top_p=0.81, temperature=1.0)
    rows = 6000
    sampler = RowSampler.create(params, [row_seed(7, r, 0) for r in range(rows)])
    tokens, _ = sampler.sample(LOGITS.expand(rows, -1))
    freq = torch.bincount(tokens, minlength=4).double() / rows
    expected = torch.tensor([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], dtype=torch.float64)
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert freq[3] == 0  # truncated token never drawn
    assert ((freq - expected).abs() <= 4 * sigma + 1e-12).all(), (freq, expected)


def test_logprob_is_after_temperature_before_truncation():
    params = SamplingParams(temperature=0.7, top_k=2, seed=1)
    sampler = RowSampler.create(params, [3, 4, 5])
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sampler.sample(logits)
    expected = torch.log_softmax(logits.double() / 0.7, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=EXACT, rtol=0)
    top2 = torch.topk(logits, 2, dim=-1).indices
    assert all(int(t) in top2[r].tolist() for r, t in enumerate(tokens))


def test_greedy_is_argmax_with_temperature_one_logprob():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(top_k=1, temperature=0.5), SamplingParams(temperature=0.0)):
        tokens, logprobs = RowSampler.create(params, [0] * 4).sample(logits)
        assert torch.equal(tokens, logits.argmax(-1))
        assert torch.allclose(logprobs, torch.log_softmax(logits.double(), -1).max(-1).values, atol=EXACT, rtol=0)


def test_row_stream_independent_of_batch_composition():
    params = SamplingParams(temperature=1.3)
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    seeds = [row_seed(11, i, 0) for i in range(5)]
    together = [RowSampler.create(params, seeds).sample(logits)[0] for _ in range(1)][0]
    alone = torch.cat([RowSampler.create(params, [s]).sample(logits[r : r + 1])[0] for r, s in enumerate(seeds)])
    assert torch.equal(together, alone)


def test_row_seed_is_deterministic_and_distinct():
    seeds = {row_seed(5, i, j) for i in range(20) for j in range(8)}
    assert len(seeds) == 160
    assert row_seed(5, 3, 2) == row_seed(5, 3, 2) != row_seed(6, 3, 2)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n": 0}, "n"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k"),
     ({"min_p": 1.0}, "min_p"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_validate_params_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        validate_params(SamplingParams(**kwargs))
