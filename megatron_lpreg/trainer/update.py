"""One step's policy update: old log-probs when the loss needs them, the global Lp-Reg threshold, then the
optimizer update(s) over mini-batches. What the loss needs comes from :func:`algo.registry.loss_requirements`."""
from __future__ import annotations

import logging
import math

import torch

from megatron_lpreg.algo.registry import loss_requirements
from megatron_lpreg.config import AlgoConfig
from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.seeding import derive_seed
from megatron_lpreg.trainer.batch import TrainBatch, split_mini_batches
from megatron_lpreg.trainer.policy import Policy, StepResult

logger = logging.getLogger(__name__)


def update_policy(policy: Policy, batch: TrainBatch, step: int, *, algo: AlgoConfig, updates: int, seed: int,
                  ctx: ParallelContext) -> StepResult:
    """Update the policy on this rank's share of the step's batch (collective over all ranks).

    On-policy (``updates == 1``) and no global selection: one update, old log-probs from the same forward.
    Otherwise a no-grad old-log-prob pass first, then ``updates`` mini-batch updates.

    Args:
        policy: the trainer's policy (model, optimizer, schedule).
        batch: this rank's TrainBatch of the step.
        step: the step index (0-based), for the dropout/sampling seed and the log.
        algo: ``cfg.algo`` (the loss and what it needs).
        updates: ``trainer.updates_per_step``.
        seed: the run seed (``cfg.seed``).
        ctx: this rank's parallel context.

    Returns:
        The last mini-batch's StepResult.
    """
    policy.set_step_seed(derive_seed(seed, step, ctx.rank, 1))
    needs = loss_requirements(algo)
    if updates > 1 or needs.global_threshold:
        batch = policy.compute_old_logprobs(batch)
    threshold = None
    if needs.global_threshold:
        from megatron_lpreg.algo.lpreg import global_lowprob_threshold

        candidates = batch.old_logprobs[(batch.loss_mask > 0) & (batch.advantages < 0)]
        threshold = global_lowprob_threshold([candidates], algo.rho, group=ctx.dp_group)
    result = None
    for mini in split_mini_batches(batch, updates):
        global_tokens = _dp_sum(ctx, float(mini.loss_mask.sum()))
        result = policy.train_step(mini, lowprob_threshold=threshold, global_valid_tokens=max(global_tokens, 1.0))
    assert result is not None
    if not math.isfinite(result.grad_norm) and not result.skipped:
        logger.warning("step %d: grad norm is not finite", step)
    return result


def _dp_sum(ctx: ParallelContext, value: float) -> float:
    if ctx.dp_size == 1:
        return value
    t = coll.all_reduce(coll.tensor([value], ctx, torch.float64), group=ctx.dp_group)
    return float(t.item())
