"""One step's data path: prompts -> rollout -> rewards -> advantages -> this rank's TrainBatch (and its metrics).
The update that follows is :func:`megatron_lpreg.trainer.update.update_policy`."""
from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from megatron_lpreg.algo.registry import compute_advantages
from megatron_lpreg.config import RunConfig, TokenClasses
from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.seeding import derive_seed
from megatron_lpreg.trainer.batch import TrainBatch, build_train_batch
from megatron_lpreg.trainer.engine_host import EngineHost

logger = logging.getLogger(__name__)


class RolloutSources(Protocol):
    """What a step's rollout reads (the trainer's Components provide it)."""

    cfg: RunConfig
    ctx: ParallelContext
    engine: EngineHost
    tokenizer: Any
    dataset: Any
    """Prompt source: ``next_batch(n)`` -> prompts with ``token_ids`` and ``ground_truth``."""
    reward: Any
    """Scorer (``reward.scorer.RewardScorer``): ``score(texts, truths)`` -> one result per text (``float(r)``)."""
    token_classes: TokenClasses | None
    """``diagnostics:`` resolved once with the run's tokenizer; None = no ``diag/*`` metrics."""


def dp_slice(items: list, dp_rank: int, dp_size: int) -> list:
    """This DP rank's contiguous share of the step's prompts (all ranks draw the same global batch)."""
    if len(items) % dp_size:
        raise ValueError(f"rollout.prompts_per_step={len(items)} must be divisible by the data-parallel size "
                         f"{dp_size}")
    share = len(items) // dp_size
    return items[dp_rank * share:(dp_rank + 1) * share]


def sampling_params(comp: RolloutSources, step: int) -> SamplingParams:
    r = comp.cfg.rollout
    stream = 0 if comp.engine.hosted else comp.ctx.dp_rank  # hosted engines sample the whole step at once
    return SamplingParams(
        n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
        max_new_tokens=r.max_new_tokens, stop_token_ids=tuple(stop_ids(comp.tokenizer)),
        seed=derive_seed(comp.cfg.seed, step, stream),
    )


def generate_for_slice(comp: RolloutSources, prompts: list, params: SamplingParams) -> tuple[list, list]:
    """(my prompts, their completions): embedded engines generate only this DP rank's slice; hosted engines
    generate the whole list once and every rank keeps its slice (prompt_index renumbered within the slice)."""
    dp, dp_rank = comp.ctx.dp_size, comp.ctx.dp_rank
    mine = dp_slice(prompts, dp_rank, dp)
    if not comp.engine.hosted:
        return mine, comp.engine.generate([p.token_ids for p in mine], params)
    everything = comp.engine.generate([p.token_ids for p in prompts], params)
    first = dp_rank * len(mine)
    kept = [c for c in everything if first <= c.prompt_index < first + len(mine)]
    for c in kept:
        c.prompt_index -= first
    return mine, kept


def stop_ids(tokenizer) -> list[int]:
    """The one stop-token rule (rollouts, in-training eval, the eval CLI): data.templates.stop_token_ids."""
    from megatron_lpreg.data.templates import stop_token_ids

    return stop_token_ids(tokenizer)


def rollout_batch(comp: RolloutSources, step: int) -> tuple[TrainBatch, dict[str, float]]:
    """Generate, score and turn this rank's share of the step's prompts into a TrainBatch."""
    cfg = comp.cfg
    prompts, completions = generate_for_slice(comp, comp.dataset.next_batch(cfg.rollout.prompts_per_step),
                                              sampling_params(comp, step))
    texts = [c.text or comp.tokenizer.decode(c.response_ids, skip_special_tokens=True) for c in completions]
    truths = [prompts[c.prompt_index].ground_truth for c in completions]
    rewards = [float(r) for r in comp.reward.score(texts, truths)]
    grouped = torch.tensor(rewards, dtype=torch.float64, device="cpu").view(len(prompts), cfg.rollout.n)
    advantages = compute_advantages(cfg.algo.advantage, grouped).reshape(-1).tolist()
    batch = build_train_batch(
        [c.prompt_ids for c in completions], [c.response_ids for c in completions],
        [c.logprobs for c in completions], advantages, pad_id=_pad_id(comp.tokenizer),
    )
    lengths = [len(c.response_ids) for c in completions]
    metrics = _exploration_metrics(comp, step, completions, texts, batch)
    metrics.update(_class_metrics(comp, batch))
    metrics.update({
        "reward/mean": sum(rewards) / len(rewards),
        "reward/all_correct_frac": float((grouped.min(dim=1).values > 0).float().mean()),
        "reward/all_wrong_frac": float((grouped.max(dim=1).values <= 0).float().mean()),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/clip_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "rollout/tokens": float(sum(lengths)),
    })
    return batch, _dp_mean(comp, metrics)


def _exploration_metrics(comp: RolloutSources, step: int, completions: list, texts: list[str],
                         batch: TrainBatch) -> dict[str, float]:
    """Low-probability sampled tokens (engine log-probs) every step; self-BLEU every logging.diversity_interval."""
    from megatron_lpreg.metrics.exploration import group_self_bleu, low_prob_token_stats

    log = comp.cfg.logging
    metrics = low_prob_token_stats(batch.engine_logprobs.flatten(), batch.loss_mask.flatten(),
                                   threshold=log.lowprob_threshold)
    metrics.pop("lowprob/count", None)
    if log.diversity_interval and step % log.diversity_interval == 0:
        n = comp.cfg.rollout.n
        groups = [texts[i:i + n] for i in range(0, len(texts), n)]
        metrics.update({k: v for k, v in group_self_bleu(groups).items() if k.endswith("self_bleu")})
    return metrics


def _class_metrics(comp: RolloutSources, batch: TrainBatch) -> dict[str, float]:
    """``diag/*`` of the whole step (docs/diagnostics.md), empty without token classes. The counts are summed over
    DP ranks first (one all-reduce), so every rank holds the step's values and ``_dp_mean`` leaves them as they are.
    """
    from megatron_lpreg.metrics.diagnostics import rollout_class_counts, rollout_class_metrics

    if comp.token_classes is None:
        return {}
    counts = rollout_class_counts(batch.targets, batch.loss_mask, batch.advantages, batch.engine_logprobs,
                                  comp.token_classes)
    if comp.ctx.dp_size > 1:
        keys = list(counts)
        summed = coll.all_reduce(coll.tensor([counts[k] for k in keys], comp.ctx, torch.float64),
                                 group=comp.ctx.dp_group)
        counts = {k: float(v) for k, v in zip(keys, summed.tolist())}
    return rollout_class_metrics(counts)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _dp_mean(comp: RolloutSources, metrics: dict[str, float]) -> dict[str, float]:
    if comp.ctx.dp_size == 1:
        return metrics
    keys = sorted(metrics)
    t = coll.all_reduce(coll.tensor([metrics[k] for k in keys], comp.ctx, torch.float64), group=comp.ctx.dp_group)
    return {k: float(v) / comp.ctx.dp_size for k, v in zip(keys, t)}
