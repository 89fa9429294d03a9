"""In-training benchmark evaluation: the run's :class:`~megatron_lpreg.eval.in_training.TrainingEvaluator` (the
same loading, sampling, grading and avg@k folding as ``megatron-lpreg eval``) driven with the trainer's engine.
Every rank takes part (TP/PP ranks generate in lockstep); embedded engines split each benchmark's problems over
the DP ranks and the graded responses are all-gathered, hosted engines generate everything once."""
from __future__ import annotations

import logging
from typing import Any

from megatron_lpreg.eval.in_training import TrainingEvaluator
from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.seeding import derive_seed
from megatron_lpreg.trainer.engine_host import EngineHost

logger = logging.getLogger(__name__)


def evaluate_heldout(evaluator: TrainingEvaluator, engine: EngineHost, ctx: ParallelContext, *, seed: int,
                     step: int) -> dict[str, Any]:
    """Score ``eval.benchmarks`` after ``step`` steps (collective over all ranks); ``{"step": step, ...}``.

    Args:
        evaluator: the run's TrainingEvaluator.
        engine: the trainer's rollout engine (embedded or hosted).
        ctx: this rank's parallel context.
        seed: the run seed (``cfg.seed``); each DP shard samples with its own seed derived from it.
        step: completed training steps (recorded as ``step``).
    """
    dp, dp_rank = ctx.dp_size, ctx.dp_rank
    if engine.hosted:  # rank 0 generates everything and every rank receives it: one shard
        dp, dp_rank = 1, 0
    gather = None
    if dp > 1:
        def gather(graded: list) -> list[list]:
            return coll.all_gather_object(graded, group=ctx.dp_group)
    return evaluator.evaluate(step, engine.generate, seed=derive_seed(seed, 777, dp_rank), shard=(dp_rank, dp),
                              gather=gather)
