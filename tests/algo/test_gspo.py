"""GSPO on a hand-computed pair of sequences: sequence ratio, clipping and the per-token gradient."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.gspo import gspo_policy_loss


def _batch():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -7.0, -7.0]], requires_grad=True)
    old = lp.detach() - torch.tensor([[0.1, 0.3, 0.0], [-0.2, 5.0, 5.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return lp, old, adv, mask


def test_sequence_ratio_value_and_gradient():
    lp, old, adv, mask = _batch()
    loss, metrics = gspo_policy_loss(lp, old, adv, mask, clip_low=0.5, clip_high=0.5)
    s0, s1 = math.exp(0.2), math.exp(-0.2)  # mean log-ratio over each sequence's valid tokens only
    assert loss.item() == pytest.approx((-s0 + s1) / 2, rel=1e-6)
    loss.backward()
    # d/dlp_t of -A sg[s] exp(lp_t - sg[lp_t]) is -A s; seq-mean-token-mean divides by |y_i| and by 2 sequences.
    want = torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [s1 / 2, 0.0, 0.0]])
    torch.testing.assert_close(lp.grad, want)
    assert metrics["actor/clipfrac"] == 0.0


def test_tight_clip_cuts_the_gradient_of_far_sequences():
    lp, old, adv, mask = _batch()
    loss, metrics = gspo_policy_loss(lp, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    # s0 = e^0.2 > 1 + 4e-4 with A > 0 -> -(1 + 4e-4); s1 = e^-0.2 < 1 - 3e-4 with A < 0 -> 1 - 3e-4.
    assert loss.item() == pytest.approx((-(1 + 4e-4) + (1 - 3e-4)) / 2, abs=1e-7)  # fp32 cancellation
    loss.backward()
    assert torch.all(lp.grad == 0)
    assert metrics["actor/clipfrac"] == 1.0
