"""Entropy bonus and 80/20 high-entropy token selection on hand-made tokens."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.algo.entropy import entropy_bonus_loss, forking_80_20_loss, top_entropy_mask


def _batch():
    lp = torch.zeros(1, 5, requires_grad=True)
    entropy = torch.tensor([[0.1, 2.0, 0.5, 3.0, 1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    return lp, torch.zeros(1, 5), entropy, adv, torch.ones(1, 5)


def test_entropy_bonus_pushes_entropy_up():
    lp, old, entropy, adv, mask = _batch()
    loss, metrics = entropy_bonus_loss(lp, old, entropy, adv, mask, entropy_coef=0.1, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1 / 5 - 0.1 * 6.6 / 5, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.full((1, 5), -0.1 / 5))
    assert metrics["entropy/mean"] == pytest.approx(6.6 / 5)


def test_80_20_keeps_gradient_on_top_entropy_tokens_only():
    lp, old, entropy, adv, mask = _batch()
    loss, metrics = forking_80_20_loss(lp, old, entropy, adv, mask, top_entropy_frac=0.4, clip_low=0.2, clip_high=0.2)
    loss.backward()
    # k = int(0.4 * 5) = 2 -> tokens 3 and 1 (both A = -1, r = 1): the authors' mean over the 2 selected tokens,
    # (1 + 1) / 2, not over all 5 valid tokens; d loss / d lp = -A r / 2 = 1/2 on each selected token.
    assert loss.item() == pytest.approx(1.0)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]) / 2)
    assert entropy.grad is None and metrics["entropy/top_threshold"] == pytest.approx(2.0)


def test_top_entropy_mask_ignores_masked_tokens():
    entropy = torch.tensor([[9.0, 1.0, 2.0]])
    chosen = top_entropy_mask(entropy, torch.tensor([[0.0, 1.0, 1.0]]), 0.2)
    assert chosen.tolist() == [[False, False, True]]
    assert not top_entropy_mask(entropy, torch.zeros(1, 3), 0.2).any()


def test_80_20_normalisation_float64_matches_the_authors():
    """Hand-derived float64 values for the authors' compute_policy_loss_8020_split (token-mean over the top 20%)."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5], [-0.2, -0.7, -1.1, -2.2, -0.9]], dtype=torch.float64,
                      requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -0.5, -3.2, -1.5], [-0.2, -0.6, -1.0, -2.0, -0.9]], dtype=torch.float64)
    entropy = torch.tensor([[0.3, 2.5, 0.1, 1.9, 0.7], [0.2, 3.1, 0.4, 0.5, 9.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0] * 5, [-0.5] * 5], dtype=torch.float64)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = forking_80_20_loss(lp, old, entropy, adv, mask, top_entropy_frac=0.2, clip_low=0.2, clip_high=0.28)
    # 9 valid tokens -> k = max(1, int(1.8)) = 1: the highest valid entropy is row 1 token 1 (3.1; 9.0 is masked).
    # There A = -0.5, r = exp(-0.7 + 0.6) = exp(-0.1) = 0.904837...; clip range [0.8, 1.28] leaves r: loss = 0.5 r.
    r = torch.exp(torch.tensor(-0.1, dtype=torch.float64))
    assert loss.item() == pytest.approx(0.5 * float(r), abs=1e-15)
    loss.backward()
    expected = torch.zeros(2, 5, dtype=torch.float64)
    expected[1, 1] = 0.5 * r
    torch.testing.assert_close(lp.grad, expected, rtol=0, atol=1e-15)
    # global_token_mean divides by the selected share of the batch count: 0.2 * 9 = 1.8 selected tokens
    g, _ = forking_80_20_loss(lp, old, entropy, adv, mask, top_entropy_frac=0.2, clip_low=0.2, clip_high=0.28,
                              loss_agg="global_token_mean", global_valid_tokens=9)
    assert g.item() == pytest.approx(0.5 * float(r) / 1.8, abs=1e-15)
