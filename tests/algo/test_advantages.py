"""Advantage estimators on hand-computed groups, including groups of one and constant groups."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.advantages import compute_advantages


def test_grpo_unbiased_std_and_eps():
    got = compute_advantages("grpo", torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    want = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (std + 1e-6)
    torch.testing.assert_close(got, want)


def test_group_of_one_and_constant_groups():
    assert compute_advantages("grpo", torch.tensor([[1.0]])).item() == pytest.approx(1 / (1 + 1e-6))
    assert compute_advantages("drgrpo", torch.tensor([[1.0]])).item() == 1.0
    assert compute_advantages("rloo", torch.tensor([[1.0]])).item() == 1.0
    for name in ("grpo", "drgrpo", "rloo"):
        out = compute_advantages(name, torch.tensor([[0.7, 0.7, 0.7], [1.0, 1.0, 1.0]]))
        assert torch.equal(out, torch.zeros(2, 3)), name


def test_drgrpo_and_rloo_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(compute_advantages("drgrpo", rewards), rewards - 0.4)
    # RLOO: R_i - mean of the other four = R_i - (2 - R_i) / 4.
    torch.testing.assert_close(compute_advantages("rloo", rewards), rewards - (2.0 - rewards) / 4)


def test_list_of_groups_of_different_sizes():
    out = compute_advantages("grpo", [[1.0, 0.0], torch.tensor([1.0]), [1, 1, 1]])
    assert [t.shape[0] for t in out] == [2, 1, 3]
    torch.testing.assert_close(out[0], torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-6))
    assert out[0].dtype == torch.float32 and torch.equal(out[2], torch.zeros(3))


@pytest.mark.parametrize("rewards", [torch.zeros(3), torch.zeros(2, 0)])
def test_bad_shapes_raise(rewards):
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages("grpo", rewards)
    with pytest.raises(ValueError, match="unknown"):
        compute_advantages("ppo", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        compute_advantages("rloo", [[1.0], []])
