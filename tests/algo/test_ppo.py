"""PPO/GRPO clipped surrogate, clip-higher and dual clip on hand-computed tokens."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.ppo import clipped_surrogate, ppo_policy_loss


def _tokens(ratios, advantages):
    lp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    return lp, torch.zeros_like(lp), torch.tensor([advantages])


def test_symmetric_clip_hand_values_and_gradient():
    lp, old, adv = _tokens([1.5, 1.1, 0.5, 0.9], [1.0, 1.0, -1.0, -1.0])
    loss, metrics = ppo_policy_loss(lp, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.2)
    # -A r vs -A clamp(r, 0.8, 1.2): token 0 -> -1.2 (clipped), 1 -> -1.1, 2 -> 0.8 (clipped), 3 -> 0.9.
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 0.9) / 4, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1.1, 0.0, 0.9]]) / 4)
    assert metrics["actor/clipfrac"] == 0.5
    assert metrics["actor/clipfrac_high"] == 0.25 and metrics["actor/clipfrac_low"] == 0.25
    assert metrics["loss/policy"] == pytest.approx(loss.item())


def test_clip_higher_lets_positive_tokens_grow_further():
    lp, old, adv = _tokens([1.25], [1.0])
    assert clipped_surrogate(lp, old, adv, clip_low=0.2, clip_high=0.2).loss.item() == pytest.approx(-1.2)
    assert clipped_surrogate(lp, old, adv, clip_low=0.2, clip_high=0.28).loss.item() == pytest.approx(-1.25)


def test_dual_clip_bounds_negative_advantage_loss():
    lp, old, adv = _tokens([5.0, 5.0, 2.0], [-1.0, 1.0, -1.0])
    out = clipped_surrogate(lp, old, adv, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0)
    # A<0, r=5: max(5, 1.2) = 5 > 3 -> 3 (dual clipped); A>0 untouched: -1.2; A<0, r=2: 2 < 3 stays.
    torch.testing.assert_close(out.loss, torch.tensor([[3.0, -1.2, 2.0]]))
    assert out.dual_clipped.tolist() == [[True, False, False]]


def test_approx_kl_is_k3_of_old_to_current():
    lp, old, adv = _tokens([2.0, 0.5], [1.0, 1.0])
    _, metrics = ppo_policy_loss(lp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    want = ((2.0 - 1 - math.log(2.0)) + (0.5 - 1 - math.log(0.5))) / 2
    assert metrics["actor/approx_kl"] == pytest.approx(want, rel=1e-6)
