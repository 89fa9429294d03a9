"""The placement plan made real on a Ray cluster with GPUs: one placement group over all GPUs of the job (one-GPU
bundles, packed per node), plan slots bound to bundles, and the engine actors that run the SGLang servers.

Binding: a tiny task per bundle reports the bundle's node and the GPU id Ray gave it; nodes are numbered in the
order their first bundle appears, a node's bundles by GPU id, so plan slot (node i, GPU g) is the g-th GPU Ray
assigned on the i-th node. Trainer rank actors and engine actors are then scheduled into those bundles; Ray sets
their ``CUDA_VISIBLE_DEVICES``; an engine's server process sees all the GPUs of its slot.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.placement import PlacementError, PlacementPlan
from megatron_lpreg.rollout.sglang_servers import EngineInfo, ServerActor

logger = logging.getLogger(__name__)

PROBE_GPU = 0.01
"""GPU share of the probe task that asks a bundle for its GPU id."""
COLOCATED_TRAINER_GPU = 0.8
COLOCATED_ENGINE_GPU = 0.1
"""Ray bookkeeping shares of a colocated bundle (the real memory split is rollout.mem_fraction_static plus the
release/resume around each update); the engine actor sits in the bundle of its engine's first GPU."""


@dataclass(frozen=True)
class BoundGpu:
    """One bundle of the job's placement group: its index, node and the GPU id Ray assigned to it."""

    bundle: int
    node_id: str
    gpu_id: int


def gpu_topology() -> tuple[int, int]:
    """(nodes with GPUs, GPUs per node) of the connected Ray cluster.

    Raises:
        PlacementError: nodes with different GPU counts (the plan assumes one shape per node).
    """
    import ray

    counts = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    counts = [c for c in counts if c > 0]
    if not counts:
        raise PlacementError("the Ray cluster has no GPUs")
    if len(set(counts)) > 1:
        raise PlacementError(f"Ray nodes have different GPU counts {sorted(counts)}; the plan needs the same count "
                             f"on every node (request whole nodes with the same GPUs)")
    return len(counts), counts[0]


def _probe() -> tuple[str, int]:
    import ray

    return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])


def bind_plan(pg: Any, plan: PlacementPlan) -> dict[tuple[int, int], BoundGpu]:
    """Map every plan slot (node, gpu) to the bundle that holds it.

    Raises:
        PlacementError: the placement group does not have ``gpus_per_node`` bundles on each of ``nodes`` nodes.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    probe = ray.remote(_probe)
    refs = [
        probe.options(num_cpus=0, num_gpus=PROBE_GPU, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i)).remote()
        for i in range(plan.nodes * plan.gpus_per_node)
    ]
    found = [BoundGpu(i, node_id, gpu) for i, (node_id, gpu) in enumerate(ray.get(refs))]
    node_order = list(dict.fromkeys(b.node_id for b in found))
    slots: dict[tuple[int, int], BoundGpu] = {}
    for node, node_id in enumerate(node_order):
        here = sorted((b for b in found if b.node_id == node_id), key=lambda b: b.gpu_id)
        if len(here) != plan.gpus_per_node:
            raise PlacementError(f"Ray put {len(here)} of the job's one-GPU bundles on node {node_id}, expected "
                                 f"{plan.gpus_per_node}")
        slots.update({(node, g): b for g, b in enumerate(here)})
    return slots


class EngineFleet:
    """The launcher's engine actors: one :class:`ServerActor` per planned engine, named ``<prefix><id>``."""

    def __init__(self, rollout: RolloutConfig, model_path: str, seed: int, plan: PlacementPlan,
                 slots: dict[tuple[int, int], BoundGpu], pg: Any, log_dir: str) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.prefix = f"mlpreg-{uuid.uuid4().hex[:8]}-engine"
        gpu_share = COLOCATED_ENGINE_GPU if plan.mode == "colocated" else 1.0
        actor_cls = ray.remote(ServerActor)
        self.actors = []
        for slot in plan.engines:
            first = slots[(slot.node, slot.gpus[0])]
            gpu_ids = [slots[(slot.node, g)].gpu_id for g in slot.gpus]
            self.actors.append(actor_cls.options(
                name=f"{self.prefix}{slot.engine_id}", num_cpus=0, num_gpus=gpu_share, max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=first.bundle),
            ).remote(rollout, model_path, seed, slot.engine_id, slot.node, gpu_ids, log_dir))
        self.engines: list[EngineInfo] = []

    def start(self) -> list[EngineInfo]:
        """Launch every server (in parallel) and wait until all answer /health."""
        import ray

        self.engines = ray.get([a.start.remote() for a in self.actors])
        for info in self.engines:
            logger.info("%s ready", info.describe())
        return self.engines

    def stop(self) -> None:
        """Stop the servers, then the actors (a killed actor would leave its server's process group behind)."""
        import ray

        try:
            ray.get([a.stop.remote() for a in self.actors], timeout=120)
        except Exception as exc:  # noqa: BLE001 - best effort at teardown; the actors are killed below anyway
            logger.warning("stopping engine servers: %s", exc)
        for actor in self.actors:
            ray.kill(actor)
