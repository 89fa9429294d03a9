"""In-training benchmark evaluation: the run's :class:`~megatron_lpreg.eval.in_training.TrainingEvaluator` (the
same loading, sampling, grading and avg@k folding as ``megatron-lpreg eval``) driven with the trainer's engine.
Every rank takes part (TP/PP ranks generate in lockstep); colocated engines split each benchmark's problems over
the DP ranks and the graded responses are all-gathered, hosted engines generate everything once."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.trainer.state import derive_seed

if TYPE_CHECKING:
    from megatron_lpreg.trainer.components import Components

logger = logging.getLogger(__name__)


def evaluate_heldout(comp: "Components", step: int) -> dict[str, Any]:
    """Score ``eval.benchmarks`` after ``step`` steps (collective over all ranks); ``{"step": step, ...}``."""
    dp, dp_rank = comp.ctx.dp_size, comp.ctx.dp_rank
    if comp.engine.hosted:  # rank 0 generates everything and every rank receives it: one shard
        dp, dp_rank = 1, 0
    gather = None
    if dp > 1:
        def gather(graded: list) -> list[list]:
            return coll.all_gather_object(graded, group=comp.ctx.dp_group)
    return comp.evaluator.evaluate(step, comp.engine.generate, seed=derive_seed(comp.cfg.seed, 777, dp_rank),
                                   shard=(dp_rank, dp), gather=gather)
