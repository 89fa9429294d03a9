"""Rollouts at cluster scale on a simulated 2-node cluster (ray.cluster_utils.Cluster, 4 declared GPUs per node).

Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES exactly as on real nodes; the engines are CPU stand-ins of
SGLang started through the production path (rollout.sglang_launch_module). Checked: every trainer rank and engine
runs where the plan says, with those GPU ids visible and the right LOCAL_RANK; every engine serves; after each sync
all engines hold bit-identical weights (gloo broadcast group of 1 + engines x engine_tp ranks); a killed engine's
work moves to the others and the engine is restarted and re-synced; a 2-step colocated training run finishes with
release -> resume -> weight update around every update. Not covered: CUDA memory, NCCL, real SGLang (notes:
cluster-simulation.md). Both nodes have this machine's loopback address, so nodes are told apart by Ray node id.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from megatron_lpreg.config import RunConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import SamplingParams, WeightUpdate
from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe
from megatron_lpreg.rollout.sglang import SGLangEngine
from megatron_lpreg.rollout.sglang_servers import RayServers
from tests.rollout.conftest import make_hf_qwen2
from tests.support.sglang_tp_rank import weights_digest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow
NODES, GPUS_PER_NODE = 2, 4
STANDIN = "tests.support.sglang_standin"
PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [42], [17, 18], [3, 4], [8], [21, 22, 23], [30]]
PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=7)


@pytest.fixture(scope="module")
def cluster():
    """One Ray cluster for the module: head + one worker, 4 declared GPUs each, on the loopback address.

    Ray turns a loopback address into the host's outward address unless it believes it runs on a laptop; tests
    may only use the loopback, so both the flag (read at import, maybe by an earlier test) and its environment
    variable (for the processes Ray starts) are set.
    """
    import ray._private.ray_constants as ray_constants

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    args = {"num_cpus": 8, "num_gpus": GPUS_PER_NODE, "node_ip_address": "127.0.0.1"}
    cl = Cluster()
    try:
        _add_nodes(cl, args)
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


def _add_nodes(cl: Cluster, args: dict, attempts: int = 3) -> None:
    """Head + one worker. Ray gives a raylet a fixed 30 s to register; on a machine loaded by other jobs that can
    run out, so a node that timed out is tried again."""
    for attempt in range(attempts):
        try:
            if cl.head_node is None:
                cl.add_node(**args, include_dashboard=False)
            if not cl.worker_nodes:
                cl.add_node(**args)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for the start-up timeout
            if cl.head_node is not None and _alive_nodes(cl, wait_for=2, timeout_s=90) >= 2:
                return  # the worker's raylet registered late: adding another one would make three nodes
            if attempt == attempts - 1:
                raise
            time.sleep(5)


def _alive_nodes(cl: Cluster, *, wait_for: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = sum(1 for n in cl.global_state.node_table() if n["Alive"])
        if alive >= wait_for or time.monotonic() > deadline:
            return alive
        time.sleep(2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return (make_hf_qwen2(tmp_path_factory.mktemp("w0"), seed=0), make_hf_qwen2(tmp_path_factory.mktemp("w1"), seed=1))


def _rollout(**kw) -> RolloutConfig:
    return RolloutConfig(engine="sglang", sglang_launch_module=STANDIN, weight_sync_backend="gloo", max_batch_size=2,
                         launch_timeout_s=300, retry_backoff_s=0.2, max_retries=1, **kw)


def _info(url: str) -> dict:
    return requests.get(f"{url}/standin/info", timeout=30).json()


def _probe(model_dir: Path):
    """The trainer's probe for the weights in ``model_dir`` (SGLang syncs require one)."""
    return make_probe(HFLogitsModel.from_pretrained(str(model_dir)), [3, 4, 5, 6, 7, 8], 3, atol=1e-4)


def test_placement_serving_sync_and_recovery(cluster, weights, tmp_path):
    from megatron_lpreg.trainer.launch import RayJob

    w0, w1 = weights
    cfg = RunConfig()
    cfg = cfg.replace(rollout=_rollout(engine_tp=2, num_engines=4, mode="colocated"),
                      model=dataclasses.replace(cfg.model, hf_path=str(w0)))
    job = RayJob(cfg, str(tmp_path / "run"), world=8)
    try:
        job.start()
        plan = job.plan
        assert len(plan.trainers) == 8 and [e.gpus for e in plan.engines] == [(0, 1), (2, 3)] * 2
        # trainer ranks: one Ray node per plan node, the planned GPU id visible, LOCAL_RANK = index on the node
        seen = ray.get([a.whereami.remote() for a in job.actors])
        node_of = {}
        for slot, where in zip(plan.trainers, seen):
            assert node_of.setdefault(slot.node, where["node_id"]) == where["node_id"]
            assert where["gpu_ids"] == [slot.gpu] and where["cuda_visible_devices"] == str(slot.gpu)
            assert where["local_rank"] == str(slot.local_rank)
        assert len(set(node_of.values())) == NODES
        # engines: on the node holding their GPU ids, the server process sees exactly those ids
        for slot, info in zip(plan.engines, job.fleet.engines):
            assert info.node_id == node_of[slot.node] and info.gpus == slot.gpus
            served = _info(info.url)
            assert served["cuda_visible_devices"] == ",".join(map(str, slot.gpus))
            assert served["argv"][served["argv"].index("--tp-size") + 1] == "2"
            assert Path(info.log_path).is_file()

        servers = RayServers.attach(job.fleet.prefix, 4, max_restarts=2)
        engine = SGLangEngine(job.cfg.rollout, str(w0), servers=servers)
        try:
            reference = engine.generate(PROMPTS, PARAMS)
            for info in servers.engines:  # least-outstanding dispatch reached every engine
                assert "/generate" in _info(info.url)["events"]

            start = time.perf_counter()
            engine.update_weights(WeightUpdate(version=1, tensors=hf_dir.iter_tensors(w1), probe=_probe(w1)))
            sync_s = time.perf_counter() - start
            (tmp_path / "sync.json").write_text(json.dumps({"engines": 4, "sync_s": sync_s}))
            print(f"\nweight sync: {sync_s:.2f} s for 4 engines ({sync_s / 4:.2f} s per engine), tiny model")
            _assert_identical(servers, w1)
            trained = engine.generate(PROMPTS, PARAMS)
            assert [c.response_ids for c in trained] != [c.response_ids for c in reference]

            # kill engine 1's server while its request is in flight (held open by an injected hang): the chunk
            # moves to another engine, the engine is restarted, and stays out of rotation until the next sync
            requests.post(f"{servers.engines[1].url}/standin/fault", json={"mode": "hang"}, timeout=10)
            victim = job.fleet.actors[1]
            killer = threading.Timer(1.0, lambda: ray.get(victim.kill_server.remote()))
            killer.start()
            again = engine.generate(PROMPTS, PARAMS)
            killer.join()
            assert [c.response_ids for c in again] == [c.response_ids for c in trained]
            assert servers.engines[1].restarts == 1 and servers.engines[1].pid != 0
            assert 1 in engine._stale  # restarted with the initial checkpoint: out of rotation until the next sync
            engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(w1), probe=_probe(w1)))
            _assert_identical(servers, w1)
            assert not engine._stale
            assert [c.response_ids for c in engine.generate(PROMPTS, PARAMS)] == [c.response_ids for c in trained]
        finally:
            engine.shutdown()
    finally:
        job.close()


def _assert_identical(servers: RayServers, expected_dir: Path) -> None:
    """Every TP rank of every engine holds exactly the weights of ``expected_dir`` (SHA-256 of all of them; the
    stand-in's debug route, since SGLang serves /get_weights_by_name for no Qwen class)."""
    want = weights_digest(dict(hf_dir.iter_tensors(expected_dir)))
    for info in servers.engines:
        got = requests.get(f"{info.url}/standin/weights_digest", timeout=120).json()["tp_ranks"]
        assert got == [want] * 2, info.describe()


def test_two_step_colocated_training_run(cluster, tmp_path):
    from megatron_lpreg.cli import main as cli_main

    out = tmp_path / "run"
    code = cli_main(["train", "configs/tiny_cpu.yaml", "trainer.max_steps=2", f"trainer.output_dir={out}",
                     "trainer.launcher=ray", "trainer.world_size=2", "rollout.engine=sglang",
                     "rollout.mode=colocated", "rollout.engine_tp=4", "rollout.num_engines=2",
                     f"rollout.sglang_launch_module={STANDIN}", "rollout.weight_sync_backend=gloo",
                     # 2 ranks on 8 engine GPUs: no trainer rank on most of them to feed a tensor sync
                     "rollout.weight_sync=distributed",
                     "rollout.launch_timeout_s=300", "rollout.prompts_per_step=4", "rollout.n=4",
                     "rollout.max_batch_size=4",  # 4 chunks: both engines serve every step
                     "eval.benchmarks=[]", "reward.name=tests.support.rewards:even_length"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    logs = sorted((out / "logs" / "engines").glob("engine*.log"))
    assert len(logs) == 2
    for log in logs:
        events = re.findall(r"standin-event (\S+)", log.read_text())
        updates = [i for i, e in enumerate(events) if e == "/begin_weight_update"]
        assert len(updates) == 2, events
        for begin in updates:  # release -> (trainer update) -> resume -> begin -> distributed pushes -> end
            before = [e for e in events[:begin] if e != "/init_weights_update_group"]  # group set-up: first sync
            assert before[-3:] == ["/generate", "/release_memory_occupation", "/resume_memory_occupation"], events
            end = events.index("/end_weight_update", begin)
            assert set(events[begin + 1 : end]) == {"/update_weights_from_distributed"}
        assert events.index("/generate") < updates[0]
