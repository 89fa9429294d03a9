"""A rollout engine in its own Ray actor (``rollout.placement=actor``).

The actor builds any engine with :func:`~megatron_lpreg.rollout.factory.build_engine` on the resources it was
given: whole GPUs (engines on devices of their own) or a fraction (colocated with trainer ranks; the engine's
memory is released while the trainer updates, when the engine supports it, e.g. SGLang's
release/resume_memory_occupation). :class:`RayEngine` is the trainer-side handle and implements the
RolloutEngine protocol; weights travel through the Ray object store in buckets of ``rollout.weight_bucket_mb``.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import Completion, EngineHealth, SamplingParams, WeightUpdate

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

    def call(self, method: str) -> Any:
        fn = getattr(self.engine, method, None)
        return fn() if fn is not None else None

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
        self.colocated = 0 < gpus < 1
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
        for bucket in _buckets(update.tensors, self.bucket_bytes):
            sums = {name: float(t.double().sum()) for name, t in bucket}
            self._ray.get(self.actor.load_bucket.remote(update.version, bucket, sums))

    def release_memory(self) -> None:
        if self.colocated:
            self._ray.get(self.actor.call.remote("release_memory"))

    def resume_memory(self) -> None:
        if self.colocated:
            self._ray.get(self.actor.call.remote("resume_memory"))

    def health(self) -> EngineHealth:
        return self._ray.get(self.actor.health.remote())

    def shutdown(self) -> None:
        try:
            self._ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            self._ray.kill(self.actor)


def _buckets(tensors: Iterable[tuple[str, torch.Tensor]], limit: int) -> Iterable[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
