"""A rollout engine in its own Ray actor (``rollout.placement=actor``).

The actor builds any engine with :func:`~megatron_lpreg.rollout.factory.build_engine` on the resources it was
given: whole GPUs (:attr:`~megatron_lpreg.rollout.base.Colocation.SEPARATE`) or a fraction
(:attr:`~megatron_lpreg.rollout.base.Colocation.COLOCATED` with trainer ranks: the engine's own release/resume_memory
run around each update). :class:`RayEngine` is the trainer-side handle and implements the RolloutEngine protocol;
weights travel through the Ray object store in buckets of ``rollout.weight_bucket_mb``
(:func:`~megatron_lpreg.rollout.weight_sync.iter_buckets`).
"""
from __future__ import annotations

import logging

import torch

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import Colocation, Completion, EngineHealth, SamplingParams, WeightUpdate
from megatron_lpreg.rollout.weight_sync import checksum, iter_buckets

logger = logging.getLogger(__name__)


class _EngineActor:
    """Actor body: owns one engine."""

    def __init__(self, cfg: RolloutConfig, model_path: str, seed: int) -> None:
        from megatron_lpreg.rollout.factory import build_engine

        self.engine = build_engine(cfg, model_path, seed=seed)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self.engine.generate(prompts, params)

    def load_bucket(self, version: int, tensors: list[tuple[str, torch.Tensor]], checksums: dict[str, float]) -> None:
        self.engine.update_weights(WeightUpdate(version=version, tensors=iter(tensors), checksums=checksums))

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def health(self) -> EngineHealth:
        return self.engine.health()

    def shutdown(self) -> None:
        self.engine.shutdown()


class RayEngine:
    """Trainer-side handle of an engine actor (implements RolloutEngine)."""

    def __init__(self, cfg: RolloutConfig, model_path: str, *, seed: int) -> None:
        import ray

        if not ray.is_initialized():
            raise ValueError("rollout.placement=actor needs trainer.launcher=ray (no Ray runtime in this process)")
        gpus = cfg.engine_num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.colocation = Colocation.COLOCATED if 0 < gpus < 1 else Colocation.SEPARATE
        """A fractional GPU shares the device with trainer ranks; a whole GPU (or none, on CPU) does not."""
        self.bucket_bytes = int(cfg.weight_bucket_mb * 2**20)
        self.actor = ray.remote(_EngineActor).options(num_cpus=0, num_gpus=gpus).remote(cfg, model_path, seed)
        self._ray = ray
        ray.get(self.actor.health.remote())
        logger.info("rollout engine '%s' in a Ray actor (%s GPUs)", cfg.engine, gpus)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self._ray.get(self.actor.generate.remote(prompts, params))

    def update_weights(self, update: WeightUpdate) -> None:
        """Ship ``update.tensors`` in buckets; the engine verifies each bucket against its checksums."""
        if update.tensors is None:
            raise ValueError("an engine actor keeps its own weights: WeightUpdate.tensors is required")
        for bucket in iter_buckets(update.tensors, self.bucket_bytes):
            sums = {name: checksum(t) for name, t in bucket}
            self._ray.get(self.actor.load_bucket.remote(update.version, bucket, sums))

    def release_memory(self) -> None:
        """The engine's own release_memory, when it shares its GPU with trainer ranks."""
        if self.colocation is Colocation.COLOCATED:
            self._ray.get(self.actor.release_memory.remote())

    def resume_memory(self) -> None:
        """The engine's own resume_memory (see :meth:`release_memory`)."""
        if self.colocation is Colocation.COLOCATED:
            self._ray.get(self.actor.resume_memory.remote())

    def health(self) -> EngineHealth:
        return self._ray.get(self.actor.health.remote())

    def shutdown(self) -> None:
        try:
            self._ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            self._ray.kill(self.actor)
