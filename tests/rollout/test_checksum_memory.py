"""Weight checksums make no whole-tensor float64 (or abs, or engine-dtype) copy: the largest allocation while
summing a 64 MiB float32 tensor stays one block, measured with torch's CPU memory profiler, which sees the
128 MiB float64 copy that ``tensor.double().sum()`` (and ``tensor.sum(dtype=torch.float64)``) makes."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_lpreg.rollout.vllm import WeightLedger
from megatron_lpreg.rollout.weight_sync import checksum, checksum_matches

ROWS, COLS = 4096, 4096
"""A 64 MiB float32 tensor: its float64 copy (128 MiB) dwarfs a default block (2**22 elements, 32 MiB as float64)."""
BLOCK_F64_BYTES = (1 << 22) * 8


def largest_allocation(fn: Callable[[], object]) -> int:
    """Bytes of the largest single CPU allocation an op made while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def test_checksums_allocate_one_block_not_a_float64_copy():
    t = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))
    whole_f64 = t.numel() * 8
    assert largest_allocation(lambda: float(t.double().sum())) >= whole_f64  # the measure sees the old copy
    assert largest_allocation(lambda: float(t.sum(dtype=torch.float64))) >= whole_f64
    for kwargs in ({}, {"absolute": True}, {"rounded_to": torch.bfloat16}):
        assert largest_allocation(lambda kw=kwargs: checksum(t, **kw)) <= BLOCK_F64_BYTES, kwargs
    ledger = WeightLedger(dtype=torch.bfloat16)  # vLLM's stream ledger: sum, |sum| and engine-dtype sum
    assert largest_allocation(lambda: list(ledger.watch([("w", t)]))) <= BLOCK_F64_BYTES


def test_blockwise_sums_equal_the_float64_sums():
    g = torch.Generator().manual_seed(1)
    for t in (torch.randn(300, 70, generator=g), torch.randn(70, 300, generator=g).t(), torch.randn((), generator=g),
              torch.randn(0, 5), torch.randn(1000, generator=g).bfloat16()):
        exact = t.double()
        scale = float(exact.abs().sum())
        assert checksum_matches(checksum(t, block_elements=64), float(exact.sum()), scale)
        assert checksum_matches(checksum(t, absolute=True, block_elements=64), scale, scale)
        assert checksum_matches(checksum(t, rounded_to=torch.bfloat16, block_elements=64),
                                float(t.bfloat16().double().sum()), scale)
    assert not checksum_matches(checksum(torch.ones(10)) + 1e-6, 10.0, 10.0)
