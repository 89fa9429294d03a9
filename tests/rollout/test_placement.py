"""The placement plan (pure): trainer ranks packed per node, engines tiling nodes (colocated) or on GPUs of their
own (separate), the weight-sync route of every engine (colocated: tensor from the trainer rank on each engine GPU;
a colocated NCCL broadcast group refused), refusals that say why and what fits, and the `plan` CLI on both paper
configs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.config import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.placement import PlacementError, SyncRoute, feeder_ranks, plan_placement

ROOT = Path(__file__).resolve().parents[2]


def _sglang(**kw) -> RolloutConfig:
    return RolloutConfig(engine="sglang", **kw)


def test_colocated_engines_tile_every_node():
    plan = plan_placement(_sglang(engine_tp=2, num_engines=4), world_size=8, nodes=2, gpus_per_node=4)
    assert [(t.rank, t.node, t.gpu, t.local_rank) for t in plan.trainers] == [
        (r, r // 4, r % 4, r % 4) for r in range(8)]
    assert [(e.engine_id, e.node, e.gpus) for e in plan.engines] == [
        (0, 0, (0, 1)), (1, 0, (2, 3)), (2, 1, (0, 1)), (3, 1, (2, 3))]
    assert plan.lines()[0] == "role=trainer rank=0 node=0 gpus=0"
    assert plan.lines()[-5] == "role=engine id=3 node=1 gpus=2,3"


def test_separate_engines_after_the_trainer_and_never_across_nodes():
    plan = plan_placement(_sglang(mode="separate", engine_tp=2, num_engines=3, num_gpus=6), world_size=9,
                          nodes=4, gpus_per_node=4)
    # rank 8 sits on node 2 GPU 0; the next TP-aligned pair there is GPUs 2,3; node 3 holds two more engines
    assert [(e.node, e.gpus) for e in plan.engines] == [(2, (2, 3)), (3, (0, 1)), (3, (2, 3))]
    assert plan.trainers[-1].node == 2 and plan.trainers[-1].gpu == 0


def test_attached_or_in_process_engines_take_no_gpus():
    plan = plan_placement(_sglang(sglang_urls=["http://h:1"], num_engines=1), world_size=4, nodes=1,
                          gpus_per_node=4)
    assert plan.engines == () and len(plan.trainers) == 4
    assert plan_placement(RolloutConfig(), world_size=2, nodes=1, gpus_per_node=2).engines == ()


@pytest.mark.parametrize("kw, world, nodes, gpn, words", [
    (dict(engine_tp=3, num_engines=16), 64, 8, 8, ["engine_tp=3", "[1, 2, 4, 8]"]),
    (dict(engine_tp=16, num_engines=4), 64, 8, 8, ["engine_tp=16", "one node"]),
    (dict(engine_tp=4, num_engines=4), 64, 8, 8, ["num_engines=4", "num_engines=16"]),
    (dict(engine_tp=4, num_engines=16), 72, 8, 8, ["world_size=72", "9 nodes"]),
    (dict(mode="separate", engine_tp=4, num_engines=2, num_gpus=4), 8, 1, 8, ["num_gpus=4", "8"]),
    (dict(mode="separate", engine_tp=4, num_engines=2, num_gpus=8), 12, 2, 8, ["world_size=12",
                                                                              "rollout.num_gpus=8"]),
])
def test_impossible_layouts_are_refused_with_a_reason_and_a_fix(kw, world, nodes, gpn, words):
    with pytest.raises(PlacementError) as info:
        plan_placement(_sglang(**kw), world_size=world, nodes=nodes, gpus_per_node=gpn)
    for word in words:
        assert word in str(info.value)


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lpreg", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_cli_places_both_paper_configs_on_8x8():
    for name, tp in (("qwen2.5-32b_lpreg_64gpu.yaml", 4), ("qwen3-14b_lpreg_64gpu.yaml", 2)):
        out = _plan_cli(f"configs/{name}", "--nodes", "8", "--gpus-per-node", "8")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        trainers = [ln for ln in lines if ln.startswith("role=trainer")]
        engines = [ln for ln in lines if ln.startswith("role=engine")]
        syncs = [ln for ln in lines if ln.startswith("role=sync")]
        assert len(trainers) == 64 and len(engines) == 64 // tp and len(lines) == 64 + 2 * (64 // tp)
        assert trainers[63] == "role=trainer rank=63 node=7 gpus=7"
        assert engines[-1] == f"role=engine id={64 // tp - 1} node=7 gpus={','.join(map(str, range(8 - tp, 8)))}"
        # tensor sync, each engine TP rank fed by the trainer rank printed on the same node and GPU, in TP order
        rank_at = {tuple(ln.split()[2:4]): ln.split()[1].split("=")[1] for ln in trainers}
        assert len(syncs) == len(engines)
        for engine, sync in zip(engines, syncs):
            _, eid, node, gpus = engine.split()
            want = [rank_at[(node, f"gpus={g}")] for g in gpus.split("=")[1].split(",")]
            assert sync == f"role=sync engine={eid.split('=')[1]} mode=tensor ranks={','.join(want)}"
        assert syncs[0] == f"role=sync engine=0 mode=tensor ranks={','.join(map(str, range(tp)))}"


def test_plan_cli_refuses_engine_tp_3_on_8_gpu_nodes():
    out = _plan_cli("configs/qwen2.5-32b_lpreg_64gpu.yaml", "rollout.engine_tp=3", "--nodes", "8",
                    "--gpus-per-node", "8")
    assert out.returncode != 0 and out.stdout == ""
    assert "rollout.engine_tp=3" in out.stderr and "divide" in out.stderr


def test_colocated_sync_is_by_tensor_from_each_engine_gpus_own_trainer_rank():
    plan = plan_placement(_sglang(engine_tp=2, num_engines=4), world_size=8, nodes=2, gpus_per_node=4)
    assert plan.syncs == tuple(SyncRoute(e, "tensor", (2 * e, 2 * e + 1)) for e in range(4))
    at = {(t.node, t.gpu): t.rank for t in plan.trainers}
    for engine, route in zip(plan.engines, plan.syncs):
        assert route.ranks == tuple(at[(engine.node, g)] for g in engine.gpus)
    assert plan.lines()[-1] == "role=sync engine=3 mode=tensor ranks=6,7"


def test_separate_engines_sync_from_rank_0_over_a_broadcast_group():
    plan = plan_placement(_sglang(mode="separate", engine_tp=2, num_engines=2, num_gpus=4), world_size=4,
                          nodes=1, gpus_per_node=8)
    assert [r.line() for r in plan.syncs] == ["role=sync engine=0 mode=distributed ranks=0",
                                              "role=sync engine=1 mode=distributed ranks=0"]


def test_tensor_sync_refuses_an_engine_gpu_without_a_trainer_rank():
    with pytest.raises(PlacementError) as info:
        plan_placement(_sglang(engine_tp=2, num_engines=4), world_size=4, nodes=2, gpus_per_node=4)
    assert "4 of the 8 engine GPUs hold no trainer rank (node 1 GPU 0" in str(info.value)
    assert "trainer.world_size = nodes x gpus_per_node" in str(info.value)
    # run-time keys (Ray node ids) work the same way; the feeders come back in TP order
    assert feeder_ranks([("b", (3, 2))], {("b", 2): 7, ("b", 3): 5}) == [(5, 7)]


def test_weight_sync_auto_resolves_by_colocation():
    assert _sglang().resolved_weight_sync() == "tensor"
    assert _sglang(mode="separate").resolved_weight_sync() == "distributed"
    assert _sglang(weight_sync="disk").resolved_weight_sync() == "disk"
    assert RolloutConfig().resolved_weight_sync() == "auto"  # local/vLLM keep their own default


def test_a_colocated_nccl_broadcast_group_is_refused_by_validation_and_plan():
    cfg = _sglang(weight_sync="distributed")  # weight_sync_backend defaults to nccl
    with pytest.raises(ConfigError, match="duplicate GPU") as info:
        cfg.validate()
    assert "rollout.weight_sync=tensor" in str(info.value) and "rollout.mode=separate" in str(info.value)
    _sglang(weight_sync="distributed", weight_sync_backend="gloo").validate()  # CPU groups: no GPU to share
    _sglang(weight_sync="distributed", mode="separate", num_gpus=4).validate()
    out = _plan_cli("configs/qwen2.5-32b_lpreg_64gpu.yaml", "rollout.weight_sync=distributed", "--nodes", "8",
                    "--gpus-per-node", "8")
    assert out.returncode == 2 and out.stdout == ""
    assert "ncclInvalidUsage" in out.stderr and "rollout.weight_sync=tensor" in out.stderr
