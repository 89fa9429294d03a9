"""Exploration metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.metrics import (
    distinct_n,
    entropy_stats,
    group_self_bleu,
    low_prob_token_stats,
    self_bleu,
    token_entropy,
    words,
)


def test_token_entropy_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float32))
    before = logits.clone()
    ent = token_entropy(logits)
    assert ent.dtype == torch.float64
    assert ent.tolist() == pytest.approx([1.5 * math.log(2), math.log(3)], rel=1e-6)  # float32 inputs
    assert torch.equal(logits, before)
    # temperature -> infinity flattens to uniform; temperature 0.5 squares the probabilities before renormalising
    p = torch.tensor([0.5, 0.25, 0.25]) ** 2
    p = p / p.sum()
    assert token_entropy(logits[:1], temperature=0.5).item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


def test_entropy_stats_masked():
    ent = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    stats = entropy_stats(ent, torch.tensor([1, 1, 1, 1, 0]))
    assert stats["entropy/mean"] == pytest.approx(1.5)
    assert stats["entropy/std"] == pytest.approx(math.sqrt(1.25))  # population std of 0..3
    assert (stats["entropy/min"], stats["entropy/max"], stats["entropy/tokens"]) == (0.0, 3.0, 4.0)
    assert stats["entropy/p50"] == pytest.approx(1.5) and stats["entropy/p90"] == pytest.approx(2.7)
    assert entropy_stats(ent, torch.zeros(5)) == {"entropy/tokens": 0.0}
    with pytest.raises(ValueError, match="mask has 2 entries"):
        entropy_stats(ent, torch.ones(2))


def test_low_prob_tokens():
    logp = torch.log(torch.tensor([0.05, 0.5, 0.09, 0.9, 0.01]))
    stats = low_prob_token_stats(logp, torch.tensor([1, 1, 1, 1, 0]), threshold=0.1)
    assert stats["lowprob/frac"] == pytest.approx(0.5)
    assert stats["lowprob/mean_prob"] == pytest.approx(0.07)
    assert stats["lowprob/count"] == 2.0
    assert low_prob_token_stats(logp[1:4:2], threshold=0.1) == {"lowprob/frac": 0.0, "lowprob/mean_prob": 0.0,
                                                                "lowprob/count": 0.0}
    with pytest.raises(ValueError, match="threshold=0"):
        low_prob_token_stats(logp, threshold=0)


def test_words():
    assert words("so \\boxed{85}, done.") == ["so", "\\", "boxed", "{", "85", "},", "done", "."]


def test_self_bleu_hand_computed():
    assert self_bleu(["a b c d", "a b c d", "a b c d"]) == pytest.approx(1.0)
    # unigram 3/4, bigram 2/3 (equal lengths, no brevity penalty), symmetric for both responses
    assert self_bleu(["a b c d", "a b c e"], max_n=2) == pytest.approx(math.sqrt(0.75 * 2 / 3))
    # 4-gram count is 0 -> smoothed to 0.1/1; trigram 1/2
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx((0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25)
    # brevity penalty exp(1 - 4/2) for the short one (p1 = 1); the long one has p1 = 2/4 and no penalty
    assert self_bleu(["a b", "a b c d"], max_n=1) == pytest.approx((math.exp(-1) + 0.5) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["a b", "  "])


def test_group_self_bleu_skips_small_groups():
    out = group_self_bleu([["a b c d", "a b c d"], ["only one"], ["a b", "a b c d"]], max_n=1)
    assert out["diversity/groups"] == 2.0
    assert out["diversity/self_bleu"] == pytest.approx((1.0 + (math.exp(-1) + 0.5) / 2) / 2)
    assert group_self_bleu([["x"]]) == {}


def test_distinct_n():
    assert distinct_n(["a b a b", "a b"], n=2) == pytest.approx(2 / 4)  # ab, ba, ab, ab -> {ab, ba}
    assert distinct_n(["a"], n=2) == 0.0
