"""The trainer's single entry point into the algorithms: ``algo.name`` -> policy loss, ``algo.advantage`` ->
advantage estimator, and what each loss needs from the vocab-parallel op.

Legend: B sequences, T tokens of one micro-batch; every tensor in :class:`PolicyLossInputs` is ``[B, T]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_lpreg.algo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from megatron_lpreg.algo.cov import clip_cov_loss, kl_cov_loss
from megatron_lpreg.algo.entropy import entropy_bonus_loss, forking_80_20_loss
from megatron_lpreg.algo.gspo import gspo_policy_loss
from megatron_lpreg.algo.lpreg import lpreg_policy_loss
from megatron_lpreg.algo.ppo import ppo_policy_loss
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.config.base import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LossRequirements", "PolicyLossInputs", "compute_advantages", "compute_policy_loss", "loss_requirements"]


@dataclass
class PolicyLossInputs:
    """Per-token inputs of one micro-batch, all ``[B, T]``.

    Attributes:
        logprobs: current log-probs of the sampled tokens (with grad), from the op's ``.logprobs``.
        old_logprobs: behaviour-policy log-probs (detached).
        advantages: per-token advantages (each response's advantage broadcast over its tokens).
        response_mask: > 0 on tokens that count (response tokens, not prompt or padding).
        proxy_logprobs: Lp-Reg proxy log-probs (detached); required by ``lpreg``.
        entropy: per-token entropy (with grad); required by ``entropy`` and ``forking_80_20``.
        lowprob_threshold: Lp-Reg global selection threshold from
            :func:`megatron_lpreg.algo.lpreg.global_lowprob_threshold`; required when ``selection == "global"``.
        global_valid_tokens: valid-token count of the gradient-accumulation batch; required by
            ``loss_agg == "global_token_mean"``.
        proxy_kl: exact proxy-KL per token (with grad) from the op; required when ``proxy_kl != "k3"``.
        generator: RNG for Clip-Cov's random draw (None = global RNG).
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    proxy_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lowprob_threshold: float | None = None
    global_valid_tokens: float | None = None
    proxy_kl: torch.Tensor | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class LossRequirements:
    """What the trainer must produce for ``cfg`` before calling :func:`compute_policy_loss`.

    Attributes:
        entropy_grad: the loss differentiates the entropy (the op computes entropy always; this says it has grad).
        proxy_logprobs: needs ``proxy_logprobs``.
        proxy_kl_direction: None, or the op's ``proxy_kl_direction`` to request with ``with_proxy_kl=True``.
        global_threshold: call ``global_lowprob_threshold`` once per step before the micro-batch loop.
        global_valid_tokens: count valid tokens over the gradient-accumulation batch first.
    """

    entropy_grad: bool
    proxy_logprobs: bool
    proxy_kl_direction: str | None
    global_threshold: bool
    global_valid_tokens: bool


def loss_requirements(cfg: AlgoConfig) -> LossRequirements:
    """The op outputs and precomputations that ``cfg`` needs (see :class:`LossRequirements`)."""
    lpreg = cfg.name == "lpreg"
    direction = {"exact_proxy_to_policy": "proxy_to_policy", "exact_policy_to_proxy": "policy_to_proxy"}.get(
        cfg.proxy_kl
    )
    return LossRequirements(
        entropy_grad=cfg.name == "entropy",
        proxy_logprobs=lpreg,
        proxy_kl_direction=direction if lpreg else None,
        global_threshold=lpreg and cfg.selection == "global",
        global_valid_tokens=cfg.loss_agg == "global_token_mean",
    )


def _require(value, field: str, cfg: AlgoConfig):
    if value is None:
        raise ValueError(f"algo.name={cfg.name} (selection={cfg.selection}, loss_agg={cfg.loss_agg}) needs "
                         f"PolicyLossInputs.{field}; see megatron_lpreg.algo.registry.loss_requirements")
    return value


def _common(cfg: AlgoConfig, x: PolicyLossInputs) -> dict:
    return {"loss_agg": cfg.loss_agg, "global_valid_tokens": x.global_valid_tokens, "loss_norm_len": cfg.loss_norm_len}


def _lpreg(cfg: AlgoConfig, x: PolicyLossInputs):
    needs = loss_requirements(cfg)
    return lpreg_policy_loss(
        x.logprobs, x.old_logprobs, _require(x.proxy_logprobs, "proxy_logprobs", cfg), x.advantages, x.response_mask,
        rho=cfg.rho, beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high, selection=cfg.selection,
        lowprob_threshold=_require(x.lowprob_threshold, "lowprob_threshold", cfg) if needs.global_threshold else None,
        proxy_kl=_require(x.proxy_kl, "proxy_kl", cfg) if needs.proxy_kl_direction else None, **_common(cfg, x),
    )


def _ppo(cfg: AlgoConfig, x: PolicyLossInputs):
    return ppo_policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, clip_low=cfg.clip_low,
                           clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, **_common(cfg, x))


def _entropy(cfg: AlgoConfig, x: PolicyLossInputs):
    return entropy_bonus_loss(x.logprobs, x.old_logprobs, _require(x.entropy, "entropy", cfg), x.advantages,
                              x.response_mask, entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, **_common(cfg, x))


def _forking(cfg: AlgoConfig, x: PolicyLossInputs):
    return forking_80_20_loss(x.logprobs, x.old_logprobs, _require(x.entropy, "entropy", cfg), x.advantages,
                              x.response_mask, top_entropy_frac=cfg.top_entropy_frac, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, **_common(cfg, x))


def _clip_cov(cfg: AlgoConfig, x: PolicyLossInputs):
    return clip_cov_loss(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, clip_cov_ratio=cfg.clip_cov_ratio,
                         clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub, clip_low=cfg.clip_low,
                         clip_high=cfg.clip_high, generator=x.generator, **_common(cfg, x))


def _kl_cov(cfg: AlgoConfig, x: PolicyLossInputs):
    return kl_cov_loss(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, kl_cov_ratio=cfg.kl_cov_ratio,
                       kl_cov_coef=cfg.kl_cov_coef, **_common(cfg, x))


def _gspo(cfg: AlgoConfig, x: PolicyLossInputs):
    return gspo_policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, clip_low=cfg.gspo_clip_low,
                            clip_high=cfg.gspo_clip_high, loss_agg=cfg.loss_agg)  # validate() requires seq-level


PolicyLossFn = Callable[[AlgoConfig, PolicyLossInputs], "tuple[torch.Tensor, dict[str, float]]"]

POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "lpreg": _lpreg,
    "grpo": _ppo,  # symmetric clip (clip_low == clip_high, 0.2 by default)
    "dapo": _ppo,  # clip-higher: the config sets clip_high > clip_low (0.28 / 0.2 in DAPO)
    "entropy": _entropy,
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "forking_80_20": _forking,
    "gspo": _gspo,
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
    return POLICY_LOSSES[cfg.name](cfg, inputs)
