"""SGLang tensor payloads (rollout/sglang_payload.py) read by SGLang's own code: a spawned SGLang TP rank
(tests/support/sglang_tp_rank.py) deserializes its entry with ``MultiprocessingSerializer.deserialize`` after
``monkey_patch_torch_reductions`` (SafeUnpickler: every global the payload names must be on SGLang's list), across
processes through torch's file_system shared memory, while the sender's own tensors and sharing strategy stay as
they were. The CUDA branch (device index -> GPU UUID) needs a GPU and is not run here."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as torch_mp

from megatron_lpreg.rollout.sglang_payload import serialize_named_tensors
from tests.support.sglang_contract import require_sglang
from tests.support.sglang_tp_rank import TPRank


@pytest.mark.slow  # two spawned interpreters importing SGLang's utils: 10-35 s on 2 busy cores
def test_each_tp_rank_reads_its_own_payload_with_sglangs_deserializer():
    require_sglang()
    big = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    named = [("w", torch.randn(3, 4)), ("b16", torch.randn(6).bfloat16()), ("view", big[2:4]),
             ("empty", torch.zeros(0))]
    before = torch_mp.get_sharing_strategy()
    payloads = [serialize_named_tensors(named) for _ in range(2)]
    assert torch_mp.get_sharing_strategy() == before  # file_system only while a payload is written
    assert not any(t.is_shared() for _, t in named) and not big.is_shared()  # the sender's tensors stay put
    assert payloads[0] != payloads[1]  # one payload per rank, each with its own shared-memory reference
    ranks = TPRank.start(2)
    try:
        for rank in ranks:
            got = pickle.loads(rank.call("from_tensor", serialized_named_tensors=payloads))
            assert [n for n, _ in got] == [n for n, _ in named]
            for (_, want), (_, have) in zip(named, got):
                assert have.dtype == want.dtype and torch.equal(have, want)
    finally:
        for rank in ranks:
            rank.stop()
