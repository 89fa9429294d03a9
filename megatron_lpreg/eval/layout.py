"""Where the engines of one evaluation run: ``megatron-lpreg eval`` and every eval-array task use one node.

The eval layout is its own (``eval.engine_tp``, ``eval.num_engines``), not the training run's: a 64-GPU training
config asks for 16 TP4 engines over 8 nodes, which on one eval node would start servers with ``--base-gpu-id`` up to
60. :func:`plan_eval_layout` resolves the two keys for a node with ``gpus_per_node`` GPUs and refuses a layout that
does not fit (``megatron-lpreg plan`` prints it next to the training plan); :func:`eval_rollout_config` is the
rollout config the eval engine is built from.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.data import EvalConfig
from megatron_lpreg.config.rollout import RolloutConfig


class EvalLayoutError(ConfigError):
    """The eval layout does not fit one node; the message names the keys and what would fit."""


@dataclass(frozen=True)
class EvalLayout:
    """The engines of one eval task on its node (engine k on GPUs ``k*engine_tp .. (k+1)*engine_tp - 1``)."""

    engine: str
    """rollout.engine: local (CPU, one in-process engine), sglang or vllm."""
    engine_tp: int
    num_engines: int
    gpus_per_node: int
    attached: bool = False
    """sglang servers given by rollout.sglang_urls: nothing is launched, nothing placed."""

    @property
    def gpus_used(self) -> int:
        return 0 if self.engine == "local" or self.attached else self.engine_tp * self.num_engines

    def lines(self) -> list[str]:
        """``role=eval engine id=<e> node=0 gpus=<g1,...>`` per launched engine (none for local/attached)."""
        if self.engine == "local" or self.attached:
            return []
        tp = self.engine_tp
        return [f"role=eval engine id={k} node=0 gpus={','.join(str(g) for g in range(k * tp, (k + 1) * tp))}"
                for k in range(self.num_engines)]

    def summary(self) -> str:
        if self.engine == "local":
            return "eval: 1 node, the local engine (CPU, in-process)"
        if self.attached:
            return f"eval: 1 node, {self.num_engines} attached sglang server(s) (rollout.sglang_urls)"
        return (f"eval: 1 node, {self.num_engines} {self.engine} engine(s) x TP{self.engine_tp} = {self.gpus_used} "
                f"of {self.gpus_per_node} GPUs")


def plan_eval_layout(eval_cfg: EvalConfig, rollout: RolloutConfig, gpus_per_node: int) -> EvalLayout:
    """Resolve ``eval.engine_tp`` (0 = rollout.engine_tp) and ``eval.num_engines`` (0 = fill the node) for a node
    with ``gpus_per_node`` GPUs.

    Raises:
        EvalLayoutError: the engines need more GPUs than the node has, or vllm with more than one engine.
    """
    if rollout.engine == "local":
        return EvalLayout(engine="local", engine_tp=1, num_engines=1, gpus_per_node=gpus_per_node)
    if rollout.engine == "sglang" and rollout.sglang_urls:
        return EvalLayout(engine="sglang", engine_tp=rollout.engine_tp, num_engines=len(rollout.sglang_urls),
                          gpus_per_node=gpus_per_node, attached=True)
    tp = eval_cfg.engine_tp or rollout.engine_tp
    tp_key = f"eval.engine_tp={tp}" if eval_cfg.engine_tp else f"eval.engine_tp=0 (= rollout.engine_tp={tp})"
    if gpus_per_node < 1:
        raise EvalLayoutError(f"an eval task with rollout.engine={rollout.engine} needs GPUs, but its node has "
                              f"{gpus_per_node}; run it on a GPU node, or use rollout.engine=local on CPU")
    if tp > gpus_per_node:
        raise EvalLayoutError(f"{tp_key} does not fit one eval node of {gpus_per_node} GPUs (an eval task runs "
                              f"on one node); set eval.engine_tp<={gpus_per_node}")
    fits = gpus_per_node // tp
    if rollout.engine == "vllm":
        if eval_cfg.num_engines > 1:
            raise EvalLayoutError(f"eval.num_engines={eval_cfg.num_engines}: the vllm engine runs one engine per "
                                  "process; use eval.num_engines=1 (or 0), or rollout.engine=sglang")
        return EvalLayout(engine="vllm", engine_tp=tp, num_engines=1, gpus_per_node=gpus_per_node)
    count = eval_cfg.num_engines or fits
    if count > fits:
        raise EvalLayoutError(
            f"eval.num_engines={count} x {tp_key} needs {count * tp} GPUs, but an eval task runs on one node "
            f"of {gpus_per_node} GPUs; set eval.num_engines<={fits} (or 0 = fill the node)")
    return EvalLayout(engine=rollout.engine, engine_tp=tp, num_engines=count, gpus_per_node=gpus_per_node)


def eval_rollout_config(rollout: RolloutConfig, layout: EvalLayout) -> RolloutConfig:
    """The run's rollout config with the eval layout's engine TP and count (what the eval engine is built from)."""
    if layout.engine == "local" or layout.attached:
        return rollout
    return dataclasses.replace(rollout, engine_tp=layout.engine_tp, num_engines=layout.num_engines)


def visible_gpus() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (Slurm sets it for a GPU allocation), else
    what torch sees (0 without CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
