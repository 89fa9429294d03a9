"""Weight-sync building blocks: bucketing, payloads, the standalone broadcast group, spot-check strictness."""
from __future__ import annotations

import base64
import pickle
import threading

import pytest
import torch

from megatron_lpreg.parallel.spawn import free_port
from megatron_lpreg.rollout.base import LogprobProbe, WeightSyncError, finish_reason
from megatron_lpreg.rollout.weight_sync import (
    WeightSamples,
    broadcast_bucket,
    checksum,
    checksum_matches,
    iter_buckets,
    serialize_named_tensors,
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


def test_payload_round_trips_cpu_tensors_inline():
    tensors = [("a.weight", torch.arange(6.0).view(2, 3)), ("b.bias", torch.tensor([1.5], dtype=torch.bfloat16))]
    restored = pickle.loads(base64.b64decode(serialize_named_tensors(tensors)))
    assert [n for n, _ in restored] == ["a.weight", "b.bias"]
    assert all(torch.equal(x, y) and x.dtype == y.dtype for (_, x), (_, y) in zip(restored, tensors))


def test_standalone_group_broadcasts_without_a_default_group():
    port, got = free_port(), {}

    def receiver():
        group = standalone_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=30)
        tensors = [("x", torch.empty(3)), ("y", torch.empty(2, 2, dtype=torch.bfloat16))]
        broadcast_bucket(group, tensors, "gloo")
        got.update(tensors)

    thread = threading.Thread(target=receiver)
    thread.start()
    group = standalone_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=30)
    sent = [("x", torch.tensor([1.0, 2.0, 3.0])), ("y", torch.ones(2, 2, dtype=torch.bfloat16))]
    broadcast_bucket(group, sent, "gloo")
    thread.join(timeout=30)
    assert not torch.distributed.is_initialized()
    assert torch.equal(got["x"], sent[0][1]) and torch.equal(got["y"], sent[1][1])
    with pytest.raises(ValueError, match="weight_sync_backend='mpi'"):
        standalone_group("mpi", "127.0.0.1", free_port(), 0, 1)


def test_spot_check_is_exact_up_to_engine_dtype_rounding():
    weight = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    samples = WeightSamples()
    samples.record([("w", weight), ("b", torch.zeros(4)), ("c", torch.ones(2))])
    assert samples.pick(2) == ["w", "c"] and samples.pick(9) == ["w", "b", "c"] and samples.pick(0) == []
    samples.check("w", weight[:1].clone(), engine="e")  # fp32 engine
    samples.check("w", weight[:1].bfloat16().float(), engine="e")  # bf16 engine
    stale = weight[:1].clone()
    stale[0, 7] += 1e-6  # a tiny RL step on one element: must be caught
    with pytest.raises(WeightSyncError, match="'w' differs"):
        samples.check("w", stale, engine="e")
