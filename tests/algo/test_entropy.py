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
    # k = int(0.4 * 5) = 2 -> tokens 3 and 1 (both A = -1): loss (1 + 1) / 5 over all valid tokens.
    assert loss.item() == pytest.approx(2 / 5)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]) / 5)
    assert entropy.grad is None and metrics["entropy/top_threshold"] == pytest.approx(2.0)


def test_top_entropy_mask_ignores_masked_tokens():
    entropy = torch.tensor([[9.0, 1.0, 2.0]])
    chosen = top_entropy_mask(entropy, torch.tensor([[0.0, 1.0, 1.0]]), 0.2)
    assert chosen.tolist() == [[False, False, True]]
    assert not top_entropy_mask(entropy, torch.zeros(1, 3), 0.2).any()
