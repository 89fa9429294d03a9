"""What every policy loss receives: the per-token tensors of one micro-batch and the step's precomputed scalars.

Legend: B sequences, T tokens of one micro-batch; every tensor in :class:`PolicyLossInputs` is ``[B, T]``.
Each loss module (``lpreg``, ``ppo``, ``entropy``, ``cov``, ``gspo``) owns a :data:`PolicyLossFn` that reads this
object and its ``AlgoConfig``; :mod:`megatron_lpreg.algo.registry` maps ``algo.name`` to it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lpreg.config.algo import AlgoConfig

__all__ = ["PolicyLossFn", "PolicyLossInputs"]


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

    def require(self, field: str, cfg: AlgoConfig) -> Any:
        """The optional input ``field``, which ``cfg`` needs.

        Raises:
            ValueError: the field is None; the message names it and the config that needs it.
        """
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"algo.name={cfg.name} (selection={cfg.selection}, loss_agg={cfg.loss_agg}) needs "
                             f"PolicyLossInputs.{field}; see megatron_lpreg.algo.registry.loss_requirements")
        return value

    def aggregation(self, cfg: AlgoConfig) -> dict[str, Any]:
        """The aggregation keywords every tensor-level loss takes: ``loss_agg``, ``global_valid_tokens`` and
        ``loss_norm_len`` (see :func:`megatron_lpreg.algo.aggregation.aggregate_loss`)."""
        return {"loss_agg": cfg.loss_agg, "global_valid_tokens": self.global_valid_tokens,
                "loss_norm_len": cfg.loss_norm_len}


PolicyLossFn = Callable[[PolicyLossInputs, AlgoConfig], "tuple[torch.Tensor, dict[str, float]]"]
"""A policy loss: ``(inputs, cfg) -> (0-dim loss, namespaced float metrics)``."""
