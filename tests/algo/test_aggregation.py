"""Loss aggregation modes on a hand-made micro-batch with rows of different lengths and an empty row."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.algo.aggregation import aggregate_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_token_mean_seq_mean_and_global():
    assert aggregate_loss(LOSS, MASK, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(LOSS, MASK, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(LOSS, MASK, "global_token_mean", global_valid_tokens=20).item() == pytest.approx(0.5)


def test_empty_micro_batch_is_zero_and_inf_in_masked_entries_ignored():
    empty = torch.zeros_like(MASK)
    for mode in ("token_mean", "seq_mean_token_mean"):
        assert aggregate_loss(LOSS, empty, mode).item() == 0.0
    loss = LOSS.clone()
    loss[2] = float("inf")
    assert aggregate_loss(loss, MASK).item() == pytest.approx(10 / 4)


def test_global_needs_a_denominator():
    with pytest.raises(ValueError, match="global_valid_tokens"):
        aggregate_loss(LOSS, MASK, "global_token_mean")
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(LOSS, MASK, "sum")
