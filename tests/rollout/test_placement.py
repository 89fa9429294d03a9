"""The placement plan (pure): trainer ranks packed per node, engines tiling nodes (colocated) or on GPUs of their
own (separate), refusals that say why and what fits, and the `plan` CLI on both paper configs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.placement import PlacementError, plan_placement

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
    assert plan.lines()[-1] == "role=engine id=3 node=1 gpus=2,3"


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
        assert len(trainers) == 64 and len(engines) == 64 // tp and len(lines) == 64 + 64 // tp
        assert trainers[63] == "role=trainer rank=63 node=7 gpus=7"
        assert engines[-1] == f"role=engine id={64 // tp - 1} node=7 gpus={','.join(map(str, range(8 - tp, 8)))}"


def test_plan_cli_refuses_engine_tp_3_on_8_gpu_nodes():
    out = _plan_cli("configs/qwen2.5-32b_lpreg_64gpu.yaml", "rollout.engine_tp=3", "--nodes", "8",
                    "--gpus-per-node", "8")
    assert out.returncode != 0 and out.stdout == ""
    assert "rollout.engine_tp=3" in out.stderr and "divide" in out.stderr
