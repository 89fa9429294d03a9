"""Start the trainer ranks: in-process / forked (``trainer.launcher=local``) or as Ray actors (``ray``).

Every rank runs :func:`megatron_lpreg.trainer.loop.run_rank`; the launcher only places processes and wires the
rendezvous (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), then returns the highest exit code.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

from megatron_lpreg.config import RunConfig

logger = logging.getLogger(__name__)


def launch(cfg: RunConfig, run_dir: str) -> int:
    """Run training with the configured launcher; return the exit code (0, or REQUEUE_EXIT_CODE)."""
    from megatron_lpreg.trainer.signals import clear_stale_request

    inside = _inside_distributed_env()
    if not inside or os.environ.get("RANK") == "0":
        clear_stale_request(run_dir, launch_started_at(os.environ, inside))
    world = cfg.trainer.world_size
    if cfg.trainer.launcher == "ray":
        return _launch_ray(cfg, run_dir, world)
    if inside:
        from megatron_lpreg.trainer.loop import run_rank

        return run_rank(cfg, run_dir)  # torchrun / srun started us: this process is one rank
    from megatron_lpreg.parallel.spawn import run_ranks

    # Even one rank runs in a forked child: the parent stays free of process groups and megatron globals.
    return max(run_ranks(_rank_entry, world, cfg, run_dir, timeout_s=7 * 24 * 3600))


def launch_started_at(environ: Mapping[str, str], inside_distributed: bool) -> float:
    """When this launch began (epoch seconds): a preemption request older than that was meant for an earlier
    attempt; one made later (Slurm's warning during start-up) is for this one.

    slurm/common.sh exports ``MLPREG_LAUNCH_TIME`` just before it starts the trainer and arms its USR1 trap, which
    also covers the srun start-up before this process exists; a value more than an hour before this process is a
    leftover in some shell's environment and is ignored. Otherwise: this process's start, or under torchrun its
    agent's (our parent).
    """
    import psutil

    me = psutil.Process()
    started = (me.parent() or me).create_time() if inside_distributed else me.create_time()
    try:
        hint = float(environ.get("MLPREG_LAUNCH_TIME", "nan"))
    except ValueError:
        hint = math.nan
    return hint if math.isfinite(hint) and started - 3600 <= hint <= started + 1 else started


def _inside_distributed_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _rank_entry(rank: int, world_size: int, cfg: RunConfig, run_dir: str) -> int:
    from megatron_lpreg.trainer.loop import run_rank

    return run_rank(cfg, run_dir)


class _RankActor:
    """Ray actor hosting one trainer rank."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        from megatron_lpreg.parallel.spawn import free_port

        return free_port()

    def run(self, cfg: RunConfig, run_dir: str, rank: int, world: int, master: str, port: int) -> int:
        import torch

        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        from megatron_lpreg.trainer.loop import run_rank

        return run_rank(cfg, run_dir)


def _launch_ray(cfg: RunConfig, run_dir: str, world: int) -> int:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started_here = not ray.is_initialized()
    if started_here:
        # RAY_ADDRESS (set by slurm/train.sbatch) joins the job's cluster; otherwise a private local instance,
        # never some other Ray cluster that happens to run on this machine.
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=True,
                     num_cpus=max(world, os.cpu_count() or 1))
    try:
        use_gpu = _cluster_has_gpus()
        bundle: dict[str, Any] = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        pg = placement_group([bundle] * world, strategy="PACK")
        ray.get(pg.ready(), timeout=600)
        threads = "1" if not use_gpu else os.environ.get("OMP_NUM_THREADS", "8")
        actor_cls = ray.remote(_RankActor)
        actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=i),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "RAY_AUTH_MODE": "disabled",
                                          "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}},
            ).remote()
            for i in range(world)
        ]
        master = ray.get(actors[0].node_ip.remote())
        port = ray.get(actors[0].free_port.remote())
        codes = ray.get([a.run.remote(cfg, run_dir, i, world, master, port) for i, a in enumerate(actors)])
        return max(codes)
    finally:
        if started_here:
            ray.shutdown()


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
