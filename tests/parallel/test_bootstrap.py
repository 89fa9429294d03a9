"""Parallel bootstrap: launcher env parsing, layout validation, and real megatron groups over gloo ranks.

Megatron's default rank order is tp-cp-ep-dp-pp, so global rank = tp_rank + tp * (dp_rank + dp * pp_rank);
the expected layouts below are derived from that rule by hand.
"""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported once here so forked ranks start fast)
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch.distributed as dist

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.parallel.bootstrap import check_layout, destroy_parallel, init_parallel, launch_env
from megatron_lpreg.parallel.spawn import free_port, run_ranks


def test_launch_env_torchrun_slurm_single() -> None:
    torchrun = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                           "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port,
            torchrun.source) == (3, 4, 1, "n0", 1234, "torchrun")
    slurm = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
                        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.master_port, slurm.source) == (
        5, 8, 1, "10.0.0.7", 20000 + 123456 % 20000, "slurm")
    single = launch_env({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "rank 2 is outside world size 2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "MASTER_ADDR is not set"),
])
def test_launch_env_errors(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        launch_env(env)


@pytest.mark.parametrize("cfg, world, match", [
    (ParallelConfig(tp=2, pp=2), 6, r"world size 6 is not divisible by parallel.tp=2 x parallel.pp=2"),
    (ParallelConfig(tp=2, dp=3), 4, r"parallel.dp=3 does not match"),
    (ParallelConfig(pp=1, vpp=2), 2, r"parallel.vpp=2 needs parallel.pp >= 2"),
    (ParallelConfig(tp=0), 2, r"parallel.tp=0 must be >= 1"),
])
def test_check_layout_errors(cfg: ParallelConfig, world: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg, world)


def test_check_layout_derives_dp() -> None:
    assert check_layout(ParallelConfig(tp=2, pp=2), 8) == 2
    assert check_layout(ParallelConfig(tp=2, pp=2, dp=2), 8) == 2


def _layout(rank: int, world: int, tp: int, pp: int, vpp: int) -> dict:
    ctx = init_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp), seed=5)
    again = init_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp), seed=5)  # same layout: accepted
    try:
        init_parallel(ParallelConfig(tp=1, pp=1), seed=5)
        conflict = ""
    except ConfigError as exc:
        conflict = str(exc)
    members = {}
    for name in ("tp_group", "pp_group", "dp_group", "mp_group"):
        # Sum of 2**rank over the group identifies its members exactly.
        t = torch.tensor([2 ** rank])
        dist.all_reduce(t, group=getattr(ctx, name))
        members[name] = sorted(r for r in range(world) if int(t) >> r & 1)
    out = dict(ranks=(ctx.tp_rank, ctx.pp_rank, ctx.dp_rank), sizes=(ctx.tp_size, ctx.pp_size, ctx.dp_size),
               vpp=ctx.vpp_size, device=str(ctx.device), backend=ctx.backend, same=again.describe() == ctx.describe(),
               conflict=conflict, first=ctx.is_first_pp_stage, last=ctx.is_last_pp_stage, **members)
    destroy_parallel(destroy_process_group=False)
    return out


@pytest.mark.parametrize("tp, pp, vpp, world", [(2, 1, 1, 2), (1, 2, 1, 2), (2, 2, 1, 4), (1, 2, 2, 4)])
def test_init_parallel_layouts(tp: int, pp: int, vpp: int, world: int) -> None:
    results = run_ranks(_layout, world, tp, pp, vpp, timeout_s=120)
    dp = world // (tp * pp)
    for rank, got in enumerate(results):
        tp_rank, dp_rank, pp_rank = rank % tp, rank // tp % dp, rank // (tp * dp)
        assert got["ranks"] == (tp_rank, pp_rank, dp_rank) and got["sizes"] == (tp, pp, dp)
        assert got["vpp"] == vpp and got["device"] == "cpu" and got["backend"] == "gloo" and got["same"]
        assert "already initialized" in got["conflict"]
        assert (got["first"], got["last"]) == (pp_rank == 0, pp_rank == pp - 1)
        assert got["tp_group"] == [r for r in range(world) if r // tp == rank // tp]
        assert got["pp_group"] == [r for r in range(world) if r % (tp * dp) == rank % (tp * dp)]
        assert got["dp_group"] == [r for r in range(world) if r % tp == tp_rank and r // (tp * dp) == pp_rank]
        assert got["mp_group"] == [r for r in range(world) if r // tp % dp == dp_rank]


def _init_from_env(rank: int, world: int, port: int) -> tuple[int, int, str]:
    import os

    dist.destroy_process_group()  # start like a torchrun rank: env only, no process group yet
    os.environ["MASTER_PORT"] = str(port)
    ctx = init_parallel(ParallelConfig(tp=2), seed=0)
    t = torch.ones(1)
    dist.all_reduce(t)
    out = (ctx.tp_rank, int(t), dist.get_backend())
    destroy_parallel()
    return out


def test_init_parallel_creates_process_group_from_env() -> None:
    assert run_ranks(_init_from_env, 2, free_port(), timeout_s=120) == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_nccl_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="backend=nccl but CUDA is not available"):
        init_parallel(ParallelConfig(backend="nccl"))


def test_a_one_task_slurm_step_is_a_single_process():
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"})
    assert (env.source, env.world_size, env.rank) == ("single", 1, 0)
