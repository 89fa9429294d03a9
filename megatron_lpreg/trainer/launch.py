"""Start the trainer ranks: in-process / forked (``trainer.launcher=local``) or as Ray actors (``ray``).

Every rank runs :func:`megatron_lpreg.trainer.loop.run_rank`; the launcher only places processes and wires the
rendezvous (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), then returns the highest exit code.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from megatron_lpreg.config import RunConfig

logger = logging.getLogger(__name__)


def launch(cfg: RunConfig, run_dir: str) -> int:
    """Run training with the configured launcher; return the exit code (0, or REQUEUE_EXIT_CODE)."""
    from megatron_lpreg.rundir import clear_stale_request

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
        from megatron_lpreg.rollout.sglang_servers import free_port

        return free_port(self.node_ip())

    def whereami(self) -> dict[str, Any]:
        """Placement as this process sees it: Ray node, assigned GPU ids, CUDA_VISIBLE_DEVICES, LOCAL_RANK."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "local_rank": os.environ.get("LOCAL_RANK")}

    def run(self, cfg: RunConfig, run_dir: str, rank: int, world: int, master: str, port: int) -> int:
        import torch

        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        os.environ.setdefault("LOCAL_RANK", "0")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        from megatron_lpreg.trainer.loop import run_rank

        return run_rank(cfg, run_dir)


def _launch_ray(cfg: RunConfig, run_dir: str, world: int) -> int:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # RAY_ADDRESS (set by slurm/train.sbatch) joins the job's cluster with its auth settings; otherwise a
        # private local instance (no token needed: nothing else can join it), never some other Ray cluster that
        # happens to run on this machine.
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", include_dashboard=False, log_to_driver=True,
                     num_cpus=max(world, os.cpu_count() or 1))
    job = RayJob(cfg, run_dir, world)
    try:
        return job.run()
    finally:
        job.close()
        if started_here:
            ray.shutdown()


class RayJob:
    """Trainer ranks (and, on GPU clusters, the rollout engines) of one run on a connected Ray cluster.

    With GPUs, the placement plan (rollout/placement.py) decides where everything runs: one placement group of
    one-GPU bundles over every GPU of the cluster, trainer rank r in the bundle of its plan slot with LOCAL_RANK =
    its index on the node, one engine actor per planned engine. Without GPUs (CPU runs, ``make demo``): one CPU
    bundle per rank.
    """

    def __init__(self, cfg: RunConfig, run_dir: str, world: int) -> None:
        import dataclasses

        # a config saved by an earlier run (checkpoint) may name that run's engine actors: never attach to those
        self.cfg = cfg.replace(rollout=dataclasses.replace(cfg.rollout, engine_fleet=""))
        self.run_dir, self.world = run_dir, world
        self.pg: Any = None
        self.fleet: Any = None
        self.actors: list[Any] = []
        self.plan: Any = None

    def start(self) -> None:
        """Place the ranks (and engines) and start the engine servers; no rank runs yet."""
        import ray
        from ray.util.placement_group import placement_group

        if ray.cluster_resources().get("GPU", 0) > 0:
            self._start_gpu()
            return
        self.pg = placement_group([{"CPU": 1}] * self.world, strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        self.actors = [self._rank_actor(i, bundle=i, num_gpus=0, env={"LOCAL_RANK": "0"}) for i in range(self.world)]

    def _start_gpu(self) -> None:
        import dataclasses

        import ray
        from ray.util.placement_group import placement_group

        from megatron_lpreg.rollout.placement import plan_placement
        from megatron_lpreg.trainer.ray_cluster import (
            COLOCATED_TRAINER_GPU,
            EngineFleet,
            bind_plan,
            gpu_topology,
        )

        nodes, gpus_per_node = gpu_topology()
        self.plan = plan = plan_placement(self.cfg.rollout, self.world, nodes, gpus_per_node)
        logger.info("placement: %s", plan.summary())
        self.pg = placement_group([{"GPU": 1, "CPU": 1}] * (nodes * gpus_per_node), strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        slots = bind_plan(self.pg, plan)
        if plan.engines:
            log_dir = os.path.join(os.path.abspath(self.run_dir), "logs", "engines")
            self.fleet = EngineFleet(self.cfg.rollout, self.cfg.model.hf_path, self.cfg.seed, plan, slots, self.pg,
                                     log_dir)
            self.fleet.start()
            self.cfg = self.cfg.replace(rollout=dataclasses.replace(self.cfg.rollout, engine_fleet=self.fleet.prefix))
        share = COLOCATED_TRAINER_GPU if plan.engines and plan.mode == "colocated" else 1
        self.actors = [
            self._rank_actor(t.rank, bundle=slots[(t.node, t.gpu)].bundle, num_gpus=share,
                             env={"LOCAL_RANK": str(t.local_rank)})
            for t in plan.trainers
        ]

    def _rank_actor(self, rank: int, *, bundle: int, num_gpus: float, env: dict[str, str]) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        threads = os.environ.get("OMP_NUM_THREADS", "8") if num_gpus else "1"
        env_vars = {"OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning", **env}
        if "RAY_AUTH_MODE" in os.environ:
            env_vars["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        return ray.remote(_RankActor).options(
            num_cpus=1, num_gpus=num_gpus, runtime_env={"env_vars": env_vars},
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                 placement_group_bundle_index=bundle),
        ).remote()

    def run(self) -> int:
        """Start (if not yet), run every rank to its end; the highest exit code."""
        import ray

        if not self.actors:
            self.start()
        master = ray.get(self.actors[0].node_ip.remote())
        port = ray.get(self.actors[0].free_port.remote())
        codes = ray.get([a.run.remote(self.cfg, self.run_dir, i, self.world, master, port)
                         for i, a in enumerate(self.actors)])
        return max(codes)

    def close(self) -> None:
        """Stop the engines, the rank actors and the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
