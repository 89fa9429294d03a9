"""Colocated tensor sync on a simulated 2-node cluster (ray.cluster_utils.Cluster, 2 declared GPUs per node).

The production path end to end, except that the training step is replaced by loading new HF weights into the
megatron model: the Ray launcher (RayJob) places 4 trainer ranks (TP2 x PP2: stage 0 on node 0, stage 1 on node 1)
and 2 colocated SGLang stand-in engines of TP2 (engine k on node k's two GPUs, each TP rank a process running
SGLang's own deserializer, tests/support/sglang_tp_rank.py); each rank builds the megatron model and an EngineHost,
and then, twice: release -> barrier -> new weights -> barrier -> resume -> barrier -> sync. Checked:

- the feeding routes found at run time from Ray's node and GPU ids are the plan's: engine k's TP rank i is fed by
  the trainer rank on the same node and GPU (ranks 0, 1 for engine 0; 2, 3 for engine 1), so stage 1's tensors reach
  engine 0 only over the trainer's own pipeline group;
- after each sync every TP rank of every engine holds exactly the weights loaded into the trainer (SHA-256 over
  every tensor, /standin/weights_digest), through CPU shared memory and SGLang's serializer;
- the engines saw release, resume, begin, tensor updates and end in that order, and never a weight-update group.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import requests

from megatron_lpreg.config import RunConfig
from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.trainer import launch
from tests.rollout.conftest import make_hf_qwen2

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from tests.cluster.test_ray_cluster import _add_nodes  # noqa: E402

pytestmark = pytest.mark.slow
STANDIN = "tests.support.sglang_standin"


class _SyncRank(launch._RankActor):
    """A trainer rank actor that runs weight syncs instead of training steps."""

    def sync(self, cfg: RunConfig, rank: int, world: int, master: str, port: int, versions: list[str]) -> dict:
        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        from megatron_lpreg.models import hf_dir
        from megatron_lpreg.models.bridge import load_hf_weights
        from megatron_lpreg.models.qwen import build_model_chunks, model_config_from_hf
        from megatron_lpreg.parallel.bootstrap import init_parallel
        from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe
        from megatron_lpreg.trainer.colocated_sync import this_gpu
        from megatron_lpreg.trainer.engine_host import EngineHost
        from tests.support.sglang_tp_rank import weights_digest

        ctx = init_parallel(cfg.parallel, seed=cfg.seed)
        model_cfg = model_config_from_hf(cfg.model.hf_path)
        chunks = build_model_chunks(model_cfg, cfg.parallel)
        load_hf_weights(chunks, cfg.model.hf_path, model_cfg, ctx)
        host = EngineHost(cfg.replace(model=model_cfg), ctx, chunks)
        out = {"rank": rank, "pp_rank": ctx.pp_rank, "where": this_gpu(), "syncs": []}
        try:
            for version, path in enumerate(versions, start=1):
                host.release_memory()
                load_hf_weights(chunks, path, model_cfg, ctx)  # stands in for the policy update
                host.resume_memory()
                # the engines' post-sync check: log-probs of a fixed sequence under the weights just loaded
                probe = make_probe(HFLogitsModel.from_pretrained(path), list(range(3, 15)), 4,
                                   atol=1e-4) if rank == 0 else None
                host.update_weights(version=version, probe=probe)
                if rank == 0:
                    urls = [info.url for info in host.engine.servers.engines]
                    digests = [requests.get(f"{u}/standin/weights_digest", timeout=120).json()["tp_ranks"]
                               for u in urls]
                    out["syncs"].append({"expected": weights_digest(dict(hf_dir.iter_tensors(path))),
                                         "engines": digests})
            out["routes"] = host._routes
            if rank == 0:
                out["events"] = [requests.get(f"{info.url}/standin/info", timeout=60).json()["events"]
                                 for info in host.engine.servers.engines]
            return out
        finally:
            host.shutdown()


@pytest.fixture(scope="module")
def small_cluster():
    """Head + one worker, 2 declared GPUs each, on the loopback address (see tests/cluster/test_ray_cluster.py)."""
    import ray._private.ray_constants as ray_constants

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    cl = Cluster()
    try:
        _add_nodes(cl, {"num_cpus": 6, "num_gpus": 2, "node_ip_address": "127.0.0.1"})
        ray.init(address=cl.address, log_to_driver=False)
        yield cl
    finally:
        ray.shutdown()
        cl.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_tp2_pp2_trainer_feeds_two_tp2_engines_from_each_gpus_own_rank(small_cluster, tmp_path, monkeypatch):
    dirs = [make_hf_qwen2(tmp_path / f"w{k}", seed=k) for k in range(3)]
    cfg = RunConfig()
    cfg = cfg.replace(
        model=dataclasses.replace(cfg.model, hf_path=str(dirs[0])),
        parallel=ParallelConfig(tp=2, pp=2),
        trainer=dataclasses.replace(cfg.trainer, world_size=4, launcher="ray"),
        rollout=RolloutConfig(engine="sglang", mode="colocated", engine_tp=2, num_engines=2,
                              sglang_launch_module=STANDIN, launch_timeout_s=300, weight_bucket_mb=0.05,
                              max_retries=1, retry_backoff_s=0.2),
    )
    assert cfg.rollout.resolved_weight_sync() == "tensor"
    monkeypatch.setattr(launch, "_RankActor", _SyncRank)
    job = launch.RayJob(cfg, str(tmp_path / "run"), world=4)
    try:
        start = time.perf_counter()
        job.start()
        assert [r.line() for r in job.plan.syncs] == ["role=sync engine=0 mode=tensor ranks=0,1",
                                                      "role=sync engine=1 mode=tensor ranks=2,3"]
        master = ray.get(job.actors[0].node_ip.remote())
        port = ray.get(job.actors[0].free_port.remote())
        results = ray.get([a.sync.remote(job.cfg, i, 4, master, port, [str(dirs[1]), str(dirs[2])])
                           for i, a in enumerate(job.actors)], timeout=600)
        print(f"\nplacement + 2 colocated syncs, TP2xPP2 -> 2 x TP2 engines: {time.perf_counter() - start:.1f} s")
    finally:
        job.close()
    assert [r["pp_rank"] for r in results] == [0, 0, 1, 1]
    nodes = [r["where"][0] for r in results]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]  # stage 0 on node 0, stage 1 on node 1
    assert [r["where"][1] for r in results] == [0, 1, 0, 1]
    assert all(r["routes"] == ((0, 1), (2, 3)) for r in results)  # the plan's routes, found at run time
    syncs = results[0]["syncs"]
    assert len(syncs) == 2 and syncs[0]["expected"] != syncs[1]["expected"]
    for sync in syncs:  # every TP rank of every engine holds exactly the trainer's weights
        assert sync["engines"] == [[sync["expected"]] * 2] * 2
    for events in results[0]["events"]:
        assert "/init_weights_update_group" not in events
        for _ in range(2):
            release = events.index("/release_memory_occupation")
            order = events[release: events.index("/end_weight_update", release) + 1]
            assert order[:3] == ["/release_memory_occupation", "/resume_memory_occupation", "/begin_weight_update"]
            assert set(order[3:-1]) == {"/update_weights_from_tensor"} and len(order) > 5
            events = events[release + len(order):]
