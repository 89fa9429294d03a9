"""Colocated tensor sync on real gloo ranks (trainer/colocated_sync.py) and the trainer's order around an update
(trainer/engine_host.py).

- TP2 x PP2 (4 ranks, the plan of 2 nodes x 2 GPUs with 2 engines x engine_tp 2: engine 0 fed by ranks 0, 1 of
  stage 0, engine 1 by ranks 2, 3 of stage 1): every engine TP rank's payload, decoded as that SGLang rank decodes
  it (``MultiprocessingSerializer.deserialize`` after ``monkey_patch_torch_reductions``, sglang 0.5.23
  ``managers/tp_worker.py:194``, SafeUnpickler included), holds every HF tensor of the model bit for bit, although
  each feeder holds only its own stage's shards;
- checksums are computed for engines that read them (local, vLLM) and never for SGLang;
- release on every engine -> barrier -> update -> free -> barrier -> resume -> barrier, seen across ranks.
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch

from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.rollout.base import WeightUpdate
from megatron_lpreg.trainer.engine_host import EngineHost
from tests.support.sglang_contract import contract_site, require_sglang, stub_unused_packages

ROUTES = ((0, 1), (2, 3))
"""plan_placement on 2 nodes x 2 GPUs, 2 engines x TP2, world 4 (tests/rollout/test_placement.py checks the
plan; this is the layout the cluster test runs)."""


def _sglang_deserializer():
    stub_unused_packages()
    sys.path.insert(0, str(contract_site()))
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    def deserialize_own_rank(payloads: list[str], tp_rank: int):
        monkey_patch_torch_reductions()  # as tp_worker.deserialize_own_rank does before every update
        return MultiprocessingSerializer.deserialize(payloads[tp_rank])

    return deserialize_own_rank


class _Recorder:
    """A hosted engine on rank 0 that keeps what it was given (and serves release/resume with a delay)."""

    def __init__(self, events: list) -> None:
        self.events, self.updates = events, []

    def update_weights(self, update: WeightUpdate) -> None:
        names = [n for n, _ in update.tensors]  # the checksums fill as the stream passes
        self.updates.append((dict(update.checksums), names))

    def release_memory(self) -> None:
        time.sleep(0.5)
        self.events.append(("engine released", time.time()))

    def resume_memory(self) -> None:
        self.events.append(("engine resume starts", time.time()))
        time.sleep(0.5)
        self.events.append(("engine resumed", time.time()))


def _host(rollout: RolloutConfig, model_cfg, ctx, chunks, engine) -> EngineHost:
    host = EngineHost.__new__(EngineHost)  # hosted on rank 0, without launching a server
    host.cfg, host.ctx, host.chunks = SimpleNamespace(rollout=rollout, model=model_cfg), ctx, chunks
    host.hosted, host.engine, host._routes = True, engine, None
    return host


def _colocated_rank(rank: int, world: int, model_dir: str) -> dict:
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.models.qwen import build_model_chunks, model_config_from_hf
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel
    from megatron_lpreg.trainer.colocated_sync import colocated_payloads

    parallel_cfg = ParallelConfig(tp=2, pp=2)
    ctx = init_parallel(parallel_cfg, seed=5)
    try:
        model_cfg = model_config_from_hf(model_dir)
        chunks = build_model_chunks(model_cfg, parallel_cfg)
        load_hf_weights(chunks, model_dir, model_cfg, ctx)
        deserialize = _sglang_deserializer() if rank == 0 else None
        received: dict[tuple[int, int], dict[str, torch.Tensor]] = {(e, i): {} for e in range(2) for i in range(2)}
        buckets = 0
        for bucket in colocated_payloads(chunks, model_cfg, ctx, ROUTES, bucket_bytes=40_000):
            buckets += 1
            names = [n for n, _ in bucket.tensors]
            for e, per_rank in enumerate(bucket.payloads):
                assert len(per_rank) == 2
                for i in range(2):
                    named = deserialize(per_rank, i)
                    assert [n for n, _ in named] == names
                    received[(e, i)].update((n, t.clone()) for n, t in named)
        out = {"rank": rank, "pp_rank": ctx.pp_rank, "buckets": buckets}
        if rank == 0:
            out["received"] = received
        for engine in ("sglang", "vllm"):  # who computes checksums (rank-0 stream, no colocated route)
            rollout = RolloutConfig(engine=engine, mode="separate", num_gpus=2)
            recorder = _Recorder([]) if rank == 0 else None
            _host(rollout, model_cfg, ctx, chunks, recorder).update_weights(version=1)
            if rank == 0:
                out[engine] = recorder.updates[0]
        return out
    finally:
        destroy_parallel(destroy_process_group=False)


def test_every_engine_tp_rank_gets_every_full_tensor_from_its_own_gpus_trainer_rank(tiny_qwen2):
    require_sglang()
    results = run_ranks(_colocated_rank, 4, str(tiny_qwen2), timeout_s=300, threads_per_rank=1)
    assert [r["pp_rank"] for r in results] == [0, 0, 1, 1]  # engine 1's feeders hold none of stage 0's shards
    assert results[0]["buckets"] > 3 and [r["buckets"] for r in results[1:]] == [0, 0, 0]  # rank 0 posts
    want = dict(hf_dir.iter_tensors(tiny_qwen2))
    for (e, i), got in results[0]["received"].items():
        assert got.keys() == want.keys(), (e, i)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (e, i, name)
    sglang_sums, sglang_names = results[0]["sglang"]
    vllm_sums, vllm_names = results[0]["vllm"]
    assert sglang_sums == {} and sorted(sglang_names) == sorted(want)  # SGLang never reads checksums
    assert vllm_sums.keys() == want.keys()
    assert all(abs(vllm_sums[n] - float(t.double().sum())) <= 1e-6 * max(1.0, float(t.double().abs().sum()))
               for n, t in want.items())


def _order_rank(rank: int, world: int) -> list:
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig(), seed=0)
    events: list = []
    host = _host(RolloutConfig(engine="sglang"), None, ctx, [], _Recorder(events) if rank == 0 else None)
    try:
        host.release_memory()
        events.append(("update starts", time.time()))
        if rank == 1:
            time.sleep(0.5)  # a slower update: the engines must not resume before it has freed its memory
        events.append(("update done", time.time()))
        host.resume_memory()
        events.append(("sync starts", time.time()))
        return events
    finally:
        destroy_parallel(destroy_process_group=False)


def test_release_barrier_update_resume_barrier_across_ranks():
    ranks = run_ranks(_order_rank, 2, timeout_s=120, threads_per_rank=1)
    engine = dict(e for e in ranks[0] if e[0].startswith("engine"))
    for events in ranks:
        at = dict(events)
        assert at["update starts"] >= engine["engine released"]  # no rank updates before every engine released
        assert at["sync starts"] >= engine["engine resumed"]  # no rank syncs before every engine resumed
    assert engine["engine resume starts"] >= max(dict(r)["update done"] for r in ranks)  # resume after all updates


def test_runtime_routes_follow_where_ranks_and_engine_gpus_really_are(monkeypatch):
    from megatron_lpreg.rollout.sglang_servers import EngineInfo
    from megatron_lpreg.trainer import colocated_sync

    def engine(node_id: str, gpus: tuple[int, ...]) -> EngineInfo:
        return EngineInfo(engine_id=0, url="http://x", node=0, node_id=node_id, gpus=gpus, log_path="")

    ctx = SimpleNamespace(rank=0)  # one process: the gathers return this rank's own answer
    monkeypatch.setattr(colocated_sync, "this_gpu", lambda: ("node-a", 3))
    assert colocated_sync.runtime_routes(ctx, [engine("node-a", (3,))]) == ((0,),)
    assert colocated_sync.runtime_routes(ctx, [engine("", (3,))]) == ((0,),)  # '' = rank 0's own host
    # an engine GPU without a trainer rank, another node, or GPUs unknown (attached): rank 0 feeds every engine
    assert colocated_sync.runtime_routes(ctx, [engine("node-a", (3, 4))]) is None
    assert colocated_sync.runtime_routes(ctx, [engine("node-b", (3,))]) is None
    assert colocated_sync.runtime_routes(ctx, [engine("", ())]) is None
    monkeypatch.setattr(colocated_sync, "this_gpu", lambda: ("node-a", None))  # no CUDA, no Ray GPU
    assert colocated_sync.runtime_routes(ctx, [engine("node-a", (0,))]) is None
