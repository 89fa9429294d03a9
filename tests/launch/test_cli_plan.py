"""``megatron-lpreg plan``: layouts refused before submission, naming the keys (issue 19's acceptance check), and
the bytes of one checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_lpreg.launch.cli_plan import check_nodes_match
from megatron_lpreg.rollout.placement import PlacementError, plan_placement

ROOT = Path(__file__).resolve().parents[2]
BIG = "configs/qwen2.5-32b_lpreg_64gpu.yaml"


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lpreg", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_world_size_that_is_not_tp_pp_dp_is_refused_naming_the_keys():
    out = _plan(BIG, "trainer.world_size=32", "rollout.num_engines=8", "--nodes", "4", "--gpus-per-node", "8")
    assert out.returncode == 2 and out.stdout == ""
    assert "error: trainer.world_size=32 != parallel.tp=8 x parallel.pp=2 x parallel.dp=4 = 64" in out.stderr
    # the same layout with dp to match is placed
    out = _plan(BIG, "trainer.world_size=32", "parallel.dp=2", "rollout.num_engines=8", "--nodes", "4",
                "--gpus-per-node", "8")
    assert out.returncode == 0, out.stderr


def test_idle_nodes_are_refused_and_the_checkpoint_bytes_printed():
    out = _plan(BIG, "rollout.engine=local", "--nodes", "9", "--gpus-per-node", "8")
    assert out.returncode == 2
    assert "--nodes=9: node(s) [8] would run nothing" in out.stderr and "--nodes=8" in out.stderr
    out = _plan(BIG, "--nodes", "8", "--gpus-per-node", "8")
    assert out.returncode == 0, out.stderr
    assert ("# checkpoint bytes=458767669248 (458.8 GB: 32,769,119,232 parameters; weights 65.5 GB + fp32 main "
            "params 131.1 GB + Adam moments 262.2 GB)") in out.stderr


def test_check_nodes_match_accepts_a_full_plan():
    from megatron_lpreg.config import RunConfig

    cfg = RunConfig.load(BIG)
    check_nodes_match(plan_placement(cfg.rollout, 64, 8, 8), 64)
    cfg.rollout.engine = "local"
    try:
        check_nodes_match(plan_placement(cfg.rollout, 8, 2, 8), 8)
    except PlacementError as exc:
        assert "node(s) [1] would run nothing" in str(exc)
    else:
        raise AssertionError("a node without a rank or an engine was accepted")
