"""TrainBatch construction: alignment of targets, masks, advantages and engine log-probs; splitting."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.trainer.batch import (
    build_train_batch,
    micro_batch_size_for,
    split_micro_batches,
    split_mini_batches,
)


def _batch():
    return build_train_batch(
        prompt_ids=[[5, 6, 7], [8, 9]],
        response_ids=[[10, 11], [12, 13, 14]],
        engine_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]],
        advantages=[1.5, -0.5],
        pad_id=0,
    )


def test_targets_masks_and_advantages_line_up():
    b = _batch()
    assert b.tokens.tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 13, 14]]
    assert b.targets.tolist() == [[6, 7, 10, 11, 0], [9, 12, 13, 14, 0]]
    # position t predicts targets[t]; the response tokens are predicted from the last prompt position on
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]
    masked_targets = b.targets[b.loss_mask.bool()].tolist()
    assert masked_targets == [10, 11, 12, 13, 14]
    assert b.advantages.tolist() == [[0, 0, 1.5, 1.5, 0], [0, -0.5, -0.5, -0.5, 0]]
    assert torch.allclose(b.engine_logprobs[b.loss_mask.bool()], torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5]))


def test_padding_to_multiple_and_errors():
    b = build_train_batch([[1]], [[2]], [[-1.0]], [1.0], pad_id=0, pad_to_multiple=8)
    assert b.tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="log-probs for"):
        build_train_batch([[1]], [[2, 3]], [[-1.0]], [1.0], pad_id=0)
    with pytest.raises(ValueError, match="no sequences"):
        build_train_batch([], [], [], [], pad_id=0)


def test_micro_and_mini_batches_partition_rows():
    b = _batch()
    assert micro_batch_size_for(seq_len=5, token_budget=9) == 1
    assert micro_batch_size_for(seq_len=5, token_budget=3) == 1
    assert micro_batch_size_for(seq_len=5, token_budget=30720) == 6144
    parts = split_micro_batches(b, 1)
    assert [p.tokens.tolist() for p in parts] == [[row] for row in b.tokens.tolist()]
    minis = split_mini_batches(b, 2)
    assert sum(m.num_sequences for m in minis) == 2
    with pytest.raises(ValueError, match="updates_per_step=3"):
        split_mini_batches(b, 3)
