"""Benchmark evaluation during training, through the same pieces as ``megatron-lpreg eval``.

:class:`TrainingEvaluator` loads every ``eval.benchmarks`` entry once, when the run starts (files from
``eval.data_dir``, the eval template, the synthetic held-out split), and refuses a config whose evaluation would
score no problem. At each evaluation it generates with the trainer's engine (data-parallel ranks split each
benchmark's problems), grades with the ``math`` reward, gathers the graded responses and folds them exactly as the
eval CLI does (avg@k at ``eval.temperature``/``eval.top_p`` with ``eval.samples`` responses for sampled
benchmarks, greedy otherwise; ``eval.training_samples`` replaces ``eval.samples`` here when set, the authors use 1).
Metrics per benchmark: ``eval/<name>/accuracy``, ``/avg@k``, ``/pass@k``,
``/mean_tokens``, ``/num_problems``. The synthetic benchmark also logs ``heldout/greedy_acc`` (its accuracy),
``heldout/sampled_acc`` (one response per problem at ``eval.temperature``) and ``heldout/num``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.data.records import Prompt
from megatron_lpreg.data.templates import stop_token_ids
from megatron_lpreg.eval.benchmarks import BenchmarkRequest
from megatron_lpreg.eval.runner import (
    Generate,
    GradedResponse,
    fold,
    generate_and_grade,
    load_requests,
    math_grader,
    sampling_params,
)
from megatron_lpreg.reward.scorer import RewardScorer

logger = logging.getLogger(__name__)

Gather = Callable[[list[GradedResponse]], list[list[GradedResponse]]]
"""All shards' graded responses (e.g. an all-gather over the data-parallel group); identity for one shard."""


class TrainingEvaluator:
    """The run's benchmarks, loaded at start; :meth:`evaluate` scores them with the trainer's engine."""

    def __init__(self, eval_cfg: EvalConfig, data_cfg: DataConfig, reward_cfg: RewardConfig, tokenizer: Any) -> None:
        """
        Raises:
            ValueError: a listed benchmark holds no problem, or (from loading) an unknown name;
            FileNotFoundError: a benchmark file missing from ``eval.data_dir``. (No benchmarks = no evaluation.)
        """
        eval_cfg.validate()
        # during training, sampled benchmarks take eval.training_samples responses (the authors: 1), when set
        self.cfg = (dataclasses.replace(eval_cfg, samples=eval_cfg.training_samples) if eval_cfg.training_samples
                    else eval_cfg)
        self.reward_cfg = reward_cfg
        self.tokenizer = tokenizer
        self.stops = tuple(stop_token_ids(tokenizer))
        self.loaded: list[tuple[BenchmarkRequest, list[Prompt]]] = (
            load_requests(eval_cfg.benchmarks, eval_cfg, tokenizer, data_cfg) if eval_cfg.benchmarks else [])
        empty = [request.name for request, prompts in self.loaded if not prompts]
        if empty:
            raise ValueError(f"eval.benchmarks {empty} hold no problem (eval.data_dir={eval_cfg.data_dir!r}); the "
                             "evaluation would score nothing: fix the files or drop those benchmarks")
        for request, prompts in self.loaded:
            logger.info("eval benchmark %s: %d problems (%s)", request.name, len(prompts),
                        "sampled" if request.spec.sampled else "greedy")

    @property
    def enabled(self) -> bool:
        return bool(self.loaded)

    def evaluate(self, step: int, generate: Generate, *, seed: int, shard: tuple[int, int] = (0, 1),
                 gather: Gather | None = None) -> dict[str, Any]:
        """Score every benchmark once; every shard must call this with the same ``step`` (collective).

        Args:
            step: the training step (recorded as ``step``).
            generate: the engine's ``generate`` (this shard's problems only).
            seed: sampling seed of this shard.
            shard: ``(index, count)`` of this caller among the ranks splitting the problems.
            gather: combines the shards' graded responses; required when ``count > 1``.

        Returns:
            ``{"step": step, "eval/<name>/...": ...}`` (identical on every shard).
        """
        if shard[1] > 1 and gather is None:
            raise ValueError(f"evaluate(shard={shard}) needs a gather function to combine the shards")
        result: dict[str, Any] = {"step": step}
        with RewardScorer(math_grader(self.reward_cfg)) as scorer:
            for request, prompts in self.loaded:
                passes = [(request, self.cfg)]
                if request.name == "synthetic":  # the demo's held-out numbers: also one sampled response each
                    sampled_spec = dataclasses.replace(request.spec, sampled=True)
                    passes.append((dataclasses.replace(request, spec=sampled_spec),
                                   dataclasses.replace(self.cfg, samples=1)))
                for which, (req, cfg) in enumerate(passes):
                    start = time.monotonic()
                    params = sampling_params(req.spec.sampled, cfg, self.stops, seed)
                    graded = generate_and_grade(prompts, generate, params, self.tokenizer, scorer,
                                                batch_size=cfg.batch_size, label=req.name, shard=shard)
                    everything = _flatten(gather([*graded]) if gather is not None else [graded])
                    folded = fold(req, len(prompts), everything, params, time.monotonic() - start)
                    if which == 0:
                        result.update(folded.metrics("eval"))
                        result[f"eval/{req.name}/num_problems"] = folded.num_problems
                    if req.name == "synthetic":
                        result["heldout/num"] = folded.num_problems
                        result["heldout/sampled_acc" if which else "heldout/greedy_acc"] = folded.accuracy
                    logger.info("eval at step %d: %s %s accuracy %.3f (k=%d, %d problems)", step, req.name,
                                folded.mode, folded.accuracy, folded.k, folded.num_problems)
        return result


def _flatten(parts: Sequence[Sequence[GradedResponse]]) -> list[GradedResponse]:
    return [g for part in parts for g in part]
