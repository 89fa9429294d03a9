"""The trainer's single entry point into the algorithms: ``algo.name`` -> policy loss, ``algo.advantage`` ->
advantage estimator, and what each loss needs from the vocab-parallel op.

Each loss module owns its :data:`~megatron_lpreg.algo.inputs.PolicyLossFn` (``(inputs, cfg) -> (loss, metrics)``);
this module only maps names to them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_lpreg.algo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from megatron_lpreg.algo.cov import clip_cov_from_inputs, kl_cov_from_inputs
from megatron_lpreg.algo.entropy import entropy_bonus_from_inputs, forking_80_20_from_inputs
from megatron_lpreg.algo.gspo import gspo_from_inputs
from megatron_lpreg.algo.inputs import PolicyLossFn, PolicyLossInputs
from megatron_lpreg.algo.lpreg import PROXY_KL_DIRECTIONS, lpreg_from_inputs
from megatron_lpreg.algo.ppo import ppo_from_inputs
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.config.base import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LossRequirements", "PolicyLossInputs", "compute_advantages", "compute_policy_loss", "loss_requirements"]


@dataclass(frozen=True)
class LossRequirements:
    """What the trainer must produce for ``cfg`` before calling :func:`compute_policy_loss`.

    Attributes:
        proxy_logprobs: needs ``proxy_logprobs``.
        proxy_kl_direction: None, or the op's ``proxy_kl_direction`` to request with ``with_proxy_kl=True``.
        global_threshold: call ``global_lowprob_threshold`` once per step before the micro-batch loop.
    """

    proxy_logprobs: bool
    proxy_kl_direction: str | None
    global_threshold: bool


def loss_requirements(cfg: AlgoConfig) -> LossRequirements:
    """The op outputs and precomputations that ``cfg`` needs (see :class:`LossRequirements`)."""
    lpreg = cfg.name == "lpreg"
    return LossRequirements(
        proxy_logprobs=lpreg,
        proxy_kl_direction=PROXY_KL_DIRECTIONS.get(cfg.proxy_kl) if lpreg else None,
        global_threshold=lpreg and cfg.selection == "global",
    )


POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "lpreg": lpreg_from_inputs,
    "grpo": ppo_from_inputs,  # symmetric clip (clip_low == clip_high, 0.2 by default)
    "dapo": ppo_from_inputs,  # clip-higher: the config sets clip_high > clip_low (0.28 / 0.2 in DAPO)
    "entropy": entropy_bonus_from_inputs,
    "clip_cov": clip_cov_from_inputs,
    "kl_cov": kl_cov_from_inputs,
    "forking_80_20": forking_80_20_from_inputs,
    "gspo": gspo_from_inputs,
}


def compute_policy_loss(cfg: AlgoConfig, inputs: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss ``cfg.name`` on one micro-batch.

    Args:
        cfg: the algorithm config (validated).
        inputs: per-token tensors and precomputed scalars; which optional fields are needed is given by
            :func:`loss_requirements`.

    Returns:
        ``(loss, metrics)``: a 0-dim loss to backpropagate and namespaced float metrics (``loss/``, ``actor/``,
        ``lpreg/``, ``entropy/``).

    Raises:
        ConfigError: unknown ``cfg.name``.
        ValueError: a required optional input is missing.
    """
    if cfg.name not in POLICY_LOSSES:
        raise ConfigError(f"algo.name={cfg.name!r} has no policy loss; choose one of {sorted(POLICY_LOSSES)}")
    if cfg.advantage not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"algo.advantage={cfg.advantage!r} unknown; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return POLICY_LOSSES[cfg.name](inputs, cfg)
