"""One entry point that brings up torch.distributed and megatron-core's model-parallel state.

:func:`init_parallel` reads the launcher's environment (torchrun, Slurm ``srun``, or Ray actors that export the
torchrun variables), initializes the default process group if nobody has yet (nccl with CUDA, gloo without),
installs the CPU shim when CUDA is absent, creates megatron's TP/PP(/VPP)/DP groups and seeds the RNG tracker.
It returns a :class:`ParallelContext`, which library code receives instead of reading ``parallel_state``.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.parallel import cpu

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """Which launcher the values came from: torchrun, slurm or single."""


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={env[name]!r} must be an integer") from exc


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/master from the environment.

    torchrun and Ray actors set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; under
    ``srun`` (no RANK) ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` are used, with ``MASTER_ADDR`` from the
    environment or ``SLURM_LAUNCH_NODE_IPADDR`` and ``MASTER_PORT`` from the environment or derived from
    ``SLURM_JOB_ID`` (so concurrent jobs on one node do not collide). With none of these: a single process.

    Args:
        env: mapping to read (default ``os.environ``).

    Raises:
        ConfigError: if a variable is malformed, the rank is out of range, or a multi-rank job has no MASTER_ADDR.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, source = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"), "torchrun"
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        default_port = DEFAULT_PORT
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env["SLURM_NTASKS"].strip() != "1":
        # (a one-task step is a single process: tools then fork their own ranks, as outside Slurm)
        rank, world, source = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS"), "slurm"
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        job = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        default_port = 20000 + job % 20000
    else:
        return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                         _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT, "single")
    if not 0 <= rank < world:
        raise ConfigError(f"{source}: rank {rank} is outside world size {world}")
    addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or ""
    if not addr:
        if world > 1:
            raise ConfigError(f"{source}: world size {world} but MASTER_ADDR is not set; export the head node address")
        addr = "127.0.0.1"
    port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port
    return LaunchEnv(rank, world, local_rank, addr, port, source)


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the TP x PP x DP layout and the process groups it talks over.

    Built once by :func:`init_parallel` and passed down; library code takes what it needs from here instead of
    reading megatron's global ``parallel_state``.
    """

    world_size: int
    rank: int
    local_rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    vpp_size: int
    """Virtual pipeline stages per PP rank (1 = no interleaving)."""
    dp_size: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    mp_group: Any
    """TP x PP group (model-parallel), e.g. for reductions over one model replica."""
    device: torch.device
    backend: str

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        """One line for logs: ``rank 3/4 tp 1/2 pp 1/2 dp 0/1 (gloo, cpu)``."""
        return (f"rank {self.rank}/{self.world_size} tp {self.tp_rank}/{self.tp_size} pp {self.pp_rank}/"
                f"{self.pp_size} (vpp {self.vpp_size}) dp {self.dp_rank}/{self.dp_size} "
                f"({self.backend}, {self.device})")


def check_layout(cfg: ParallelConfig, world_size: int) -> int:
    """Validate TP/PP/VPP/DP against the world size before any process group is touched.

    Returns:
        The data-parallel size.

    Raises:
        ConfigError: naming the field, its value and the rule.
    """
    cfg.validate()
    model_parallel = cfg.tp * cfg.pp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp={cfg.tp} x parallel.pp={cfg.pp} "
            f"= {model_parallel}; launch a multiple of {model_parallel} ranks"
        )
    dp = world_size // model_parallel
    if cfg.dp not in (0, dp):
        raise ConfigError(
            f"parallel.dp={cfg.dp} does not match world size {world_size} / (tp {cfg.tp} x pp {cfg.pp}) = {dp}; "
            f"set parallel.dp=0 (derive) or {dp}"
        )
    if cfg.sequence_parallel and cfg.tp > 1 and not cpu.cuda_available():
        raise ConfigError("parallel.sequence_parallel=true needs CUDA and the Transformer Engine spec; set it false")
    return dp


def _resolve_backend(cfg: ParallelConfig) -> str:
    if cfg.backend == "nccl" and not cpu.cuda_available():
        raise ConfigError("parallel.backend=nccl but CUDA is not available; use backend=gloo or auto")
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if cpu.cuda_available() else "gloo"


def init_parallel(cfg: ParallelConfig, *, seed: int = 0, timeout_s: float = 1800.0) -> ParallelContext:
    """Initialize torch.distributed (if needed) and megatron's parallel state; return this rank's context.

    Safe to call again with the same layout (returns the existing context); a different layout raises.

    Args:
        cfg: TP/PP/VPP/DP sizes and backend.
        seed: root seed. Python's ``random``, torch's CPU RNG and megatron's RNG tracker are seeded with
            ``seed + 100 * pp_rank`` (different init per pipeline stage, as Megatron-LM does); the tracker adds
            the TP-rank offset itself.
        timeout_s: collective timeout for the process groups.

    Raises:
        ConfigError: bad layout for the world size, nccl without CUDA, or a conflicting existing layout.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    backend = _resolve_backend(cfg)
    env = launch_env()
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        backend = dist.get_backend()
        local_rank = env.local_rank
    else:
        world, rank, local_rank = env.world_size, env.rank, env.local_rank
    dp = check_layout(cfg, world)
    if cpu.cuda_available():
        # LOCAL_RANK is the rank's index on its node; a Ray actor sees only its own GPU (CUDA_VISIBLE_DEVICES=<id>)
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        cpu.install_cpu_shim()
        cpu.enter_cpu_mode()
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        logger.info("initialized %s process group from %s env: rank %d/%d", backend, env.source, rank, world)
    vpp = cfg.vpp if cfg.vpp > 1 else None
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_virtual_pipeline_model_parallel_world_size())
        if have != (cfg.tp, cfg.pp, vpp):
            raise ConfigError(f"megatron parallel state already initialized as (tp, pp, vpp)={have}, "
                              f"requested {(cfg.tp, cfg.pp, vpp)}; call destroy_parallel() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
            virtual_pipeline_model_parallel_size=vpp, distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
    pp_rank = ps.get_pipeline_model_parallel_rank()
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    ctx = ParallelContext(
        world_size=world, rank=rank, local_rank=local_rank,
        tp_size=cfg.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=cfg.pp, pp_rank=pp_rank, vpp_size=cfg.vpp,
        dp_size=dp, dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), mp_group=ps.get_model_parallel_group(),
        device=device, backend=backend,
    )
    logger.info("parallel layout: %s", ctx.describe())
    return ctx


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tear down megatron's parallel state and (by default) the default process group. Idempotent."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
