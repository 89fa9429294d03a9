"""Where every trainer rank and every rollout engine runs on a GPU cluster: one pure plan, no Ray.

The job's GPUs are numbered (node, gpu) with node and GPU ids 0-based; the Ray launcher makes one placement group
of one-GPU bundles over all of them (packed per node) and maps plan slots to bundles, so what runs is what
``megatron-lpreg plan`` prints.

- Trainer ranks are packed per node in rank order: rank r on node r // gpus_per_node, GPU r % gpus_per_node.
- ``rollout.mode=colocated``: every node runs gpus_per_node / engine_tp engines on the same GPUs as its trainer
  ranks (engine e of node i holds GPUs e*engine_tp .. e*engine_tp+engine_tp-1); the engines release their memory
  while the trainer updates.
- ``rollout.mode=separate``: engines take ``rollout.num_gpus`` GPUs of their own, after the trainer's, node by
  node; an engine never spans two nodes (its TP group talks over NVLink).

Weight sync (``rollout.weight_sync``, ``auto`` resolved by ``RolloutConfig.resolved_weight_sync``): ``tensor``
feeds TP rank i of engine e from the trainer rank on the same node and GPU as that engine rank (CUDA IPC on one
GPU; the trainer's own groups bring it the other stages' tensors first), so no process group ever holds two ranks
of one GPU; ``distributed`` broadcasts from trainer rank 0 over an NCCL group with every engine rank, which only
``mode=separate`` allows. ``plan`` prints one ``role=sync`` line per engine.

Engines are planned only when this project launches them (``rollout.engine=sglang`` without
``rollout.sglang_urls``); attached servers and in-process engines (local, vLLM) need no GPUs of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig


class PlacementError(ConfigError):
    """A layout that cannot be placed on the given nodes (message says why and what would fit)."""


@dataclass(frozen=True)
class TrainerSlot:
    """One trainer rank: node and GPU id (0-based, node-local), and its rank among the node's trainer ranks."""

    rank: int
    node: int
    gpu: int
    local_rank: int


@dataclass(frozen=True)
class EngineSlot:
    """One rollout engine (one server, TP inside): its node and node-local GPU ids."""

    engine_id: int
    node: int
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class SyncRoute:
    """How engine ``engine_id`` receives new weights: ``tensor`` from ``ranks`` (one trainer rank per engine TP rank,
    in TP order, each on that engine rank's GPU), or ``distributed`` from the source rank(s) ``ranks``."""

    engine_id: int
    mode: Literal["tensor", "distributed", "disk"]
    ranks: tuple[int, ...]

    def line(self) -> str:
        """``role=sync engine=<e> mode=<mode> ranks=<r1,...>`` (what ``megatron-lpreg plan`` prints)."""
        return f"role=sync engine={self.engine_id} mode={self.mode} ranks={','.join(map(str, self.ranks))}"


@dataclass(frozen=True)
class PlacementPlan:
    """The placement of a job: ``nodes`` x ``gpus_per_node`` GPUs, trainer ranks and engines on them."""

    nodes: int
    gpus_per_node: int
    mode: Literal["colocated", "separate"]
    trainers: tuple[TrainerSlot, ...]
    engines: tuple[EngineSlot, ...]
    syncs: tuple[SyncRoute, ...] = ()
    """One weight-sync route per engine, in engine-id order (empty when no engines are placed)."""

    def lines(self) -> list[str]:
        """The plan as ``megatron-lpreg plan`` prints it: one line per trainer rank, one per engine, then one sync
        line per engine."""
        out = [f"role=trainer rank={t.rank} node={t.node} gpus={t.gpu}" for t in self.trainers]
        out += [f"role=engine id={e.engine_id} node={e.node} gpus={','.join(map(str, e.gpus))}" for e in self.engines]
        out += [route.line() for route in self.syncs]
        return out

    def summary(self) -> str:
        """One line: ranks and engines per node."""
        per_node = []
        for node in range(self.nodes):
            ranks = sum(t.node == node for t in self.trainers)
            engines = sum(e.node == node for e in self.engines)
            per_node.append(f"node{node}: {ranks} ranks, {engines} engines")
        tp = len(self.engines[0].gpus) if self.engines else 0
        layout = f"each node: {per_node[0].split(': ')[1]}" if len(set(p.split(": ")[1] for p in per_node)) == 1 \
            else "; ".join(per_node)
        return (f"{self.nodes} nodes x {self.gpus_per_node} GPUs, {len(self.trainers)} trainer ranks, "
                f"{len(self.engines)} engines (TP{tp}, {self.mode}); {layout}")


def engines_launched(rollout: RolloutConfig) -> bool:
    """True when this project starts the rollout servers itself (and must place them)."""
    return rollout.engine == "sglang" and not rollout.sglang_urls


def plan_placement(rollout: RolloutConfig, world_size: int, nodes: int, gpus_per_node: int) -> PlacementPlan:
    """Place ``world_size`` trainer ranks and the configured engines on ``nodes`` x ``gpus_per_node`` GPUs.

    Args:
        rollout: the rollout config (engine, mode, engine_tp, num_engines, num_gpus).
        world_size: trainer ranks (``trainer.world_size``).
        nodes: nodes of the job.
        gpus_per_node: GPUs on each node (the same on every node).

    Returns:
        The plan (trainer slots in rank order, engine slots in engine-id order).

    Raises:
        PlacementError: the layout cannot be placed; the message says why and what would fit.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise PlacementError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
    total = nodes * gpus_per_node
    launched = engines_launched(rollout)
    tp = rollout.engine_tp
    if launched and gpus_per_node % tp:
        fits = [d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0]
        raise PlacementError(
            f"rollout.engine_tp={tp} does not divide the {gpus_per_node} GPUs of a node: an engine's TP group must "
            f"sit on one node and engines must tile its GPUs; use rollout.engine_tp in {fits}"
        )
    trainer_gpus = total if rollout.mode == "colocated" or not launched else total - rollout.num_gpus
    if world_size > trainer_gpus:
        engine_part = f" (rollout.num_gpus={rollout.num_gpus} go to the engines)" if trainer_gpus < total else ""
        raise PlacementError(
            f"trainer.world_size={world_size} needs {world_size} GPUs but {nodes} nodes x {gpus_per_node} GPUs "
            f"leave {trainer_gpus} for the trainer{engine_part}; use trainer.world_size<={trainer_gpus} or "
            f"{-(-(world_size + total - trainer_gpus) // gpus_per_node)} nodes"
        )
    trainers = tuple(
        TrainerSlot(rank=r, node=r // gpus_per_node, gpu=r % gpus_per_node, local_rank=r % gpus_per_node)
        for r in range(world_size)
    )
    if not launched:
        return PlacementPlan(nodes=nodes, gpus_per_node=gpus_per_node, mode=rollout.mode, trainers=trainers,
                             engines=())
    if rollout.mode == "colocated":
        engines = _colocated_engines(rollout, nodes, gpus_per_node)
    else:
        engines = _separate_engines(rollout, world_size, nodes, gpus_per_node)
    return PlacementPlan(nodes=nodes, gpus_per_node=gpus_per_node, mode=rollout.mode, trainers=trainers,
                         engines=engines, syncs=sync_routes(rollout, trainers, engines))


def sync_routes(rollout: RolloutConfig, trainers: tuple[TrainerSlot, ...],
                engines: tuple[EngineSlot, ...]) -> tuple[SyncRoute, ...]:
    """Each engine's weight-sync route (see the module docstring).

    Raises:
        PlacementError: ``tensor`` sync where an engine GPU holds no trainer rank to feed it.
    """
    mode = rollout.resolved_weight_sync()
    if mode == "tensor":
        at = {(t.node, t.gpu): t.rank for t in trainers}
        feeders = feeder_ranks([(e.node, e.gpus) for e in engines], at)
        return tuple(SyncRoute(e.engine_id, "tensor", ranks) for e, ranks in zip(engines, feeders))
    return tuple(SyncRoute(e.engine_id, mode, (0,)) for e in engines)  # rank 0 broadcasts (or writes the HF dir)


def feeder_ranks(engines: list[tuple[object, tuple[int, ...]]], trainer_at: dict[tuple[object, int], int]
                 ) -> list[tuple[int, ...]]:
    """For each engine (node, GPU ids in TP order): the trainer rank on each of its GPUs, in TP order.

    ``node`` is any key both sides share (a plan node index, a Ray node id). Used by the plan and, with the GPUs
    Ray reports, by the trainer at run time.

    Raises:
        PlacementError: some engine GPU holds no trainer rank (the message lists them and the fix).
    """
    missing = [(node, gpu) for node, gpus in engines for gpu in gpus if (node, gpu) not in trainer_at]
    if missing:
        shown = ", ".join(f"node {n} GPU {g}" for n, g in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise PlacementError(
            f"rollout.weight_sync=tensor feeds every engine TP rank from the trainer rank on its own GPU, but "
            f"{len(missing)} of the {sum(len(g) for _, g in engines)} engine GPUs hold no trainer rank ({shown}); "
            f"place a trainer rank on every engine GPU (colocated: trainer.world_size = nodes x gpus_per_node), or "
            f"rollout.mode=separate with rollout.weight_sync=distributed"
        )
    return [tuple(trainer_at[(node, gpu)] for gpu in gpus) for node, gpus in engines]


def _colocated_engines(rollout: RolloutConfig, nodes: int, gpus_per_node: int) -> tuple[EngineSlot, ...]:
    tp = rollout.engine_tp
    per_node = gpus_per_node // tp
    if rollout.num_engines != nodes * per_node:
        raise PlacementError(
            f"rollout.num_engines={rollout.num_engines}, but rollout.mode=colocated runs gpus_per_node / engine_tp "
            f"= {gpus_per_node} / {tp} = {per_node} engines on each of {nodes} nodes; set rollout.num_engines="
            f"{nodes * per_node}, or use rollout.mode=separate with rollout.num_gpus"
        )
    return tuple(
        EngineSlot(engine_id=node * per_node + k, node=node, gpus=tuple(range(k * tp, (k + 1) * tp)))
        for node in range(nodes) for k in range(per_node)
    )


def _separate_engines(rollout: RolloutConfig, world_size: int, nodes: int,
                      gpus_per_node: int) -> tuple[EngineSlot, ...]:
    tp = rollout.engine_tp
    if rollout.num_gpus != rollout.num_engines * tp:
        raise PlacementError(
            f"rollout.mode=separate: rollout.num_gpus={rollout.num_gpus} must equal rollout.num_engines x "
            f"rollout.engine_tp = {rollout.num_engines} x {tp} = {rollout.num_engines * tp}"
        )
    engines: list[EngineSlot] = []
    for node in range(nodes):
        first_free = min(gpus_per_node, max(0, world_size - node * gpus_per_node))
        # engines start on a TP-aligned GPU so that they never straddle the trainer's last GPU of the node
        start = -(-first_free // tp) * tp
        for gpu in range(start, gpus_per_node - tp + 1, tp):
            if len(engines) < rollout.num_engines:
                engines.append(EngineSlot(engine_id=len(engines), node=node, gpus=tuple(range(gpu, gpu + tp))))
    if len(engines) < rollout.num_engines:
        raise PlacementError(
            f"rollout.mode=separate: only {len(engines)} TP{tp} engines fit beside {world_size} trainer ranks on "
            f"{nodes} nodes x {gpus_per_node} GPUs (an engine stays on one node, on TP-aligned GPUs), "
            f"rollout.num_engines={rollout.num_engines}; use rollout.num_engines={len(engines)} "
            f"(rollout.num_gpus={len(engines) * tp}) or more nodes"
        )
    return tuple(engines)
