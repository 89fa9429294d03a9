"""Packed, token-balanced micro-batches (trainer.packing): the partition, the packed layout, and on a real
megatron rank the same log-probs (within 1e-5, fp32) and gradients as the padded path, also at PP2."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.trainer.batch import balanced_partitions, build_train_batch, pack_micro_batches, sequence_lengths
from tests.support.tiny import tiny_model_dir
from tests.trainer.test_policy import _cfg, _grads, _policy

LOGPROB_ATOL = 1e-5


def test_balanced_partitions_respect_the_budget_and_balance():
    assert balanced_partitions([100, 3, 3, 3, 50, 50], 100) == [[0], [1, 3, 4], [2, 5]]
    lengths = [7, 30, 5, 12, 40, 9, 3, 22, 18, 2]
    bins = balanced_partitions(lengths, 50)
    assert sorted(i for b in bins for i in b) == list(range(10))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert len(bins) == 3 and max(loads) <= 50 and max(loads) - min(loads) <= 10, loads
    assert balanced_partitions([80, 5], 50) == [[0], [1]]  # longer than the budget: a bin of its own
    with pytest.raises(ValueError, match="budget 0"):
        balanced_partitions([1], 0)


def test_packed_layout():
    b = build_train_batch([[1, 2, 3], [4, 5], [6]], [[7, 8], [9, 10, 11, 12], [13]], [[-1.0] * 2, [-1.0] * 4, [-1.0]],
                          [1.0, -1.0, 0.5], pad_id=0)
    assert sequence_lengths(b) == [5, 6, 2]
    packs = pack_micro_batches(b, 8)
    assert [p.indices for p in packs] == [[1], [0, 2]]
    p = packs[1]
    assert p.tokens.tolist() == [[1, 2, 3, 7, 8, 6, 13]] and p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert p.targets.tolist() == [[2, 3, 7, 8, 0, 13, 0]]
    mask = p.attention_mask()[0, 0]
    assert not mask[6, 5] and mask[6, 4] and mask[3, 4] and not mask[4, 0]  # own past only
    torch.testing.assert_close(p.unpack(p.targets.float()), p.batch.targets.float() * p.valid)
    assert [q.seq_len for q in pack_micro_batches(b, 8, uniform=True)] == [7, 7]


def _long_tailed_batch(seed=0, n=10, vocab=300):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    lens = [2, 3, 2, 40, 4, 3, 25, 2, 5, 3][:n]
    responses = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]
    return build_train_batch(prompts, responses, [[-1.0] * len(r) for r in responses],
                             torch.randn(n, generator=g).tolist(), pad_id=0)


def _compare(rank, world, cfg):
    policy, ctx = _policy(cfg, micro_batch_tokens=60)
    batch = _long_tailed_batch()
    out = {}
    for packing in (False, True):
        policy.packing = packing
        with_old = policy.compute_old_logprobs(batch)
        policy.accumulate_gradients(batch, global_valid_tokens=float(batch.loss_mask.sum()))
        out[packing] = (with_old.old_logprobs * batch.loss_mask, with_old.proxy_logprobs * batch.loss_mask,
                        _grads(policy))
    diff = float((out[True][0] - out[False][0]).abs().max())
    proxy_diff = float((out[True][1] - out[False][1]).abs().max())
    grads = max(float((out[True][2][k] - out[False][2][k]).abs().max() / out[False][2][k].abs().max().clamp(min=1e-12))
                for k in out[False][2])
    return diff, proxy_diff, grads, ctx.pp_rank


@pytest.mark.parametrize("pp", [1, 2])
def test_packed_logprobs_and_gradients_equal_padded(pp):
    cfg = _cfg(tiny_model_dir("qwen2"), algo="grpo", pp=pp, world=pp, loss_agg="global_token_mean")
    for diff, proxy_diff, grads, _ in run_ranks(_compare, pp, cfg, timeout_s=300):
        assert diff <= LOGPROB_ATOL and proxy_diff <= LOGPROB_ATOL, (diff, proxy_diff)
        assert grads <= 1e-4, grads
