"""Clip-Cov and KL-Cov on a hand-made micro-batch whose token covariances are [1.5, 0.5, 0.5, 1.5]."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.cov import clip_cov_loss, kl_cov_loss, token_covariance

LOG_RATIO = [0.1, -0.2, 0.3, 0.0]


def _batch():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    old = lp.detach() - torch.tensor([LOG_RATIO])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return lp, old, adv, torch.ones(1, 4)


def test_token_covariance():
    lp, _, adv, mask = _batch()
    torch.testing.assert_close(token_covariance(lp, adv, mask), torch.tensor([[1.5, 0.5, 0.5, 1.5]]))


def test_kl_cov_penalizes_top_covariance_tokens():
    lp, old, adv, mask = _batch()
    loss, metrics = kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.5, kl_cov_coef=2.0)
    r = [math.exp(x) for x in LOG_RATIO]
    want = (-r[0] + 2 * 0.1) + (-r[1]) + r[2] + (r[3] + 0.0)
    assert loss.item() == pytest.approx(want / 4, rel=1e-6)
    assert metrics["actor/kl_cov_frac"] == 0.5
    loss.backward()
    # gradient of |lp - old| is sign(log ratio): +1 on token 0, 0 on token 3 (ratio exactly 1).
    torch.testing.assert_close(lp.grad, torch.tensor([[-r[0] + 2.0, -r[1], r[2], r[3]]]) / 4)


def test_clip_cov_detaches_one_random_eligible_token():
    lp, old, adv, mask = _batch()
    loss, metrics = clip_cov_loss(
        lp, old, adv, mask, clip_cov_ratio=0.25, clip_cov_lb=1.0, clip_cov_ub=5.0, clip_low=0.2, clip_high=0.2,
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    zero = (lp.grad == 0).reshape(-1).tolist()
    # eligible: covariance in (1, 5) and not PPO-clipped -> tokens 0 and 3; exactly one is detached.
    assert zero[1] is False and zero[2] is False and zero[0] != zero[3]
    assert metrics["actor/cov_detached_frac"] == 0.25
