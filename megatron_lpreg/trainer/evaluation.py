"""In-training evaluation on the dataset's held-out problems (greedy and sampled accuracy)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.trainer.rollout_step import stop_ids
from megatron_lpreg.trainer.state import derive_seed

if TYPE_CHECKING:
    from megatron_lpreg.trainer.components import Components

logger = logging.getLogger(__name__)


def evaluate_heldout(comp: "Components", step: int) -> dict[str, Any]:
    """Accuracy on ``dataset.heldout()``: greedy, and sampled at the eval temperature. Every rank takes part
    (TP/PP ranks generate in lockstep); DP ranks split the problems and the counts are summed."""
    prompts = comp.dataset.heldout()
    dp, dp_rank = comp.ctx.dp_size, comp.ctx.dp_rank
    if comp.engine.hosted:  # rank 0 generates everything; count it once
        dp, dp_rank = 1, 0
    mine = prompts[dp_rank::dp]
    result: dict[str, Any] = {"step": step, "heldout/num": len(prompts)}
    modes = {"greedy": SamplingParams(n=1, top_k=1, max_new_tokens=comp.cfg.eval.max_new_tokens,
                                      stop_token_ids=tuple(stop_ids(comp.tokenizer)), seed=0),
             "sampled": SamplingParams(n=1, temperature=comp.cfg.eval.temperature,
                                       max_new_tokens=comp.cfg.eval.max_new_tokens,
                                       stop_token_ids=tuple(stop_ids(comp.tokenizer)),
                                       seed=derive_seed(comp.cfg.seed, 777, dp_rank))}
    for name, params in modes.items():
        correct = 0.0
        if mine:
            completions = comp.engine.generate([p.token_ids for p in mine], params)
            texts = [c.text or comp.tokenizer.decode(c.response_ids, skip_special_tokens=True) for c in completions]
            scores = comp.reward.score_batch(texts, [mine[c.prompt_index].ground_truth for c in completions])
            correct = float(sum(float(s) for s in scores))
        total = coll.tensor([correct], comp.ctx, torch.float64)
        if dp > 1:
            coll.all_reduce(total, group=comp.ctx.dp_group)
        result[f"heldout/{name}_acc"] = float(total.item()) / max(1, len(prompts))
    logger.info("eval at step %d: greedy %.3f sampled %.3f (%d problems)", step, result["heldout/greedy_acc"],
                result["heldout/sampled_acc"], len(prompts))
    return result
