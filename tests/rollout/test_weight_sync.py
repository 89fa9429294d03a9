"""Weight-sync building blocks: bucketing, payloads, checksums, the probe check, and the weight-update group met by
SGLang's own ``init_custom_process_group`` (its TP ranks in spawned processes)."""
from __future__ import annotations

import pickle

import pytest
import torch

from megatron_lpreg.parallel.spawn import free_port
from megatron_lpreg.rollout.base import LogprobProbe, WeightSyncError, finish_reason
from megatron_lpreg.rollout.weight_sync import (
    GROUP_NAME_PREFIX,
    broadcast_bucket,
    checksum,
    checksum_matches,
    destroy_group,
    iter_buckets,
    new_group_name,
    standalone_group,
    verify_probe,
)


def test_buckets_respect_the_byte_budget():
    sizes = [10, 10, 30, 5, 100, 1]  # float32 elements: 40, 40, 120, 20, 400, 4 bytes
    stream = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    buckets = [[name for name, _ in b] for b in iter_buckets(stream, bucket_bytes=100)]
    # 40+40 fits, +120 does not; 120 alone; 20 then 400 does not fit; 400 alone (too big for any bucket); 4
    assert buckets == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert list(iter_buckets([], 100)) == []


def test_checksums_agree_up_to_summation_order_only():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert checksum_matches(checksum(t.flip(0)), checksum(t), scale=checksum(t.abs()))
    assert not checksum_matches(checksum(t) + 1e-3, checksum(t), scale=checksum(t.abs()))
    assert checksum_matches(1.0 + 5e-10, 1.0) and not checksum_matches(1.0 + 2e-9, 1.0)  # scale = |expected|


def test_probe_passes_within_atol_and_names_the_engine_otherwise():
    probe = LogprobProbe(token_ids=(1, 2, 3, 4), prompt_len=2, expected_logprobs=(-0.5, -1.0), atol=1e-3)
    calls = []

    def score(token_ids, prompt_len):
        calls.append((token_ids, prompt_len))
        return [-0.5, -1.0005]

    assert verify_probe(score, probe, engine="e0") == pytest.approx(5e-4)
    assert calls == [([1, 2, 3, 4], 2)]
    with pytest.raises(WeightSyncError, match=r"e1: probe log-probs differ .* by 0\.01"):
        verify_probe(lambda ids, n: [-0.5, -1.01], probe, engine="e1")
    with pytest.raises(WeightSyncError, match="e2: probe returned 1 log-probs, expected 2"):
        verify_probe(lambda ids, n: [-0.5], probe, engine="e2")


def test_engine_finish_reasons_map_to_stop_length_or_abort():
    assert [finish_reason(r) for r in ("stop", "length", "abort", "cancelled", None)] == [
        "stop", "length", "abort", "abort", "abort"]


@pytest.fixture(scope="module")
def sglang_ranks():
    """Two SGLang TP ranks in processes of their own, joining groups with SGLang's ``init_custom_process_group``."""
    from tests.support.sglang_contract import require_sglang
    from tests.support.sglang_tp_rank import TPRank

    require_sglang()
    ranks = TPRank.start(2)
    yield ranks
    for rank in ranks:
        rank.stop()


def _join(ranks, host, port, world, group_name):
    for rank in ranks:
        rank.submit("init_group", master_address=host, master_port=port, rank_offset=1, world_size=world,
                    group_name=group_name, backend="gloo")


def test_the_trainer_meets_sglangs_init_custom_process_group_in_successive_groups(sglang_ranks):
    """Trainer rank 0 (``standalone_group``) + 2 engine TP ranks in spawned processes running sglang 0.5.23's own
    ``init_custom_process_group`` (world 3, gloo): a bucket arrives bit-exact; the group is destroyed on both
    sides and a second group under a new name forms and works in the same processes."""
    from torch.distributed.distributed_c10d import _world

    bucket = [("x", torch.randn(5, 3, generator=torch.Generator().manual_seed(0))),
              ("y", torch.arange(7, dtype=torch.bfloat16)),
              ("z", torch.tensor([1e-30, -0.0, 3.5], dtype=torch.float16))]
    names = [new_group_name(), new_group_name()]
    assert names[0] != names[1] and all(n.startswith(GROUP_NAME_PREFIX) for n in names)
    for round_, group_name in enumerate(names):
        port = free_port()
        _join(sglang_ranks, "127.0.0.1", port, 3, group_name)
        group = standalone_group("gloo", "127.0.0.1", port, 0, 3, timeout_s=60, group_name=group_name)
        assert [r.result(60) for r in sglang_ranks] == ["Succeeded to initialize custom process group."] * 2
        assert _world.pg_names[group] == group_name
        sent = [(n, t * (round_ + 1)) for n, t in bucket]
        for rank in sglang_ranks:
            rank.submit("receive", names=[n for n, _ in sent], dtypes=[str(t.dtype) for _, t in sent],
                        shapes=[list(t.shape) for _, t in sent], group_name=group_name)
        broadcast_bucket(group, sent, "gloo")
        for rank in sglang_ranks:
            got = pickle.loads(rank.result(60))
            assert [n for n, _ in got] == [n for n, _ in sent]
            for (_, a), (_, b) in zip(got, sent):
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))
        assert [r.call("destroy_group", group_name=group_name) for r in sglang_ranks] == [
            "Succeeded to destroy custom process group."] * 2
        destroy_group(group)
        assert group_name not in _world.pg_names.values()
        with pytest.raises(RuntimeError, match="does not exist"):  # the old name is gone on the engine side too
            sglang_ranks[0].call("destroy_group", group_name=group_name)
    assert not torch.distributed.is_initialized()


def _beside_default_group(rank, world):
    from tests.support.sglang_tp_rank import TPRank

    assert torch.distributed.is_initialized()  # as in the trainer: megatron's default group exists
    ranks = TPRank.start(1)
    try:
        port, name = free_port(), new_group_name()
        _join(ranks, "127.0.0.1", port, 2, name)
        group = standalone_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=60, group_name=name)
        ranks[0].result(60)
        sent = [("w", torch.randn(3, 4))]
        ranks[0].submit("receive", names=["w"], dtypes=["float32"], shapes=[[3, 4]], group_name=name)
        broadcast_bucket(group, sent, "gloo")
        exact = torch.equal(pickle.loads(ranks[0].result(60))[0][1], sent[0][1])
        ranks[0].call("destroy_group", group_name=name)
        destroy_group(group)
        torch.distributed.barrier()  # the default group is untouched
        return exact
    finally:
        TPRank.stop_all(ranks)


def test_the_group_forms_beside_the_trainers_default_group():
    from megatron_lpreg.parallel.spawn import run_ranks
    from tests.support.sglang_contract import require_sglang

    require_sglang()
    assert run_ranks(_beside_default_group, 1, timeout_s=240) == [True]


def test_an_old_group_name_is_not_met_by_a_new_group(sglang_ranks):
    """Engine ranks joining under the previous name never meet a trainer group of a new name: keys differ."""
    port, old, new = free_port(), new_group_name(), new_group_name()
    _join(sglang_ranks[:1], "127.0.0.1", port, 2, old)
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        standalone_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=3, group_name=new)
    with pytest.raises(RuntimeError, match="(?i)timeout|timed out|connection was likely closed"):
        sglang_ranks[0].result(60)  # the engine rank waited on its own keys until the trainer's store went away


def test_the_former_store_layout_never_meets_sglangs_ranks(sglang_ranks):
    """What the trainer built before (``PrefixStore("weight_sync", TCPStore)`` + a raw gloo group) waits on keys
    SGLang's ranks never write (issue 18: ``/weight_sync/0/1`` against ``/weight_sync/weight_sync//cpu//0/0``)."""
    import datetime

    port, name = free_port(), new_group_name()
    _join(sglang_ranks[:1], "127.0.0.1", port, 2, name)
    timeout = datetime.timedelta(seconds=3)
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timeout)
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("weight_sync", store), 0, 2, timeout)
    del store
    with pytest.raises(RuntimeError, match="(?i)timeout|timed out|connection was likely closed"):
        sglang_ranks[0].result(60)


def test_standalone_group_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="weight_sync_backend='mpi'"):
        standalone_group("mpi", "127.0.0.1", free_port(), 0, 1)
