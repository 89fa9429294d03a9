"""``evaluate``: generate with any rollout engine, grade with the math reward, write results and raw generations.

Outputs in ``out_dir``: ``results.json`` (per benchmark numbers + settings), ``results.md`` (a table) and
``generations/<benchmark>.jsonl`` (one line per response: prompt, response, ground truth, score, reason).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.data.records import Prompt
from megatron_lpreg.data.templates import decode, stop_token_ids
from megatron_lpreg.eval.benchmarks import BenchmarkRequest, load_benchmark, parse_benchmarks
from megatron_lpreg.eval.scoring import BenchmarkResult, markdown_table, summarize
from megatron_lpreg.reward.scorer import RewardScorer
from megatron_lpreg.rollout.base import Completion, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalResults:
    """All benchmarks of one evaluation."""

    benchmarks: list[BenchmarkResult]
    settings: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out: dict[str, float] = {}
        for result in self.benchmarks:
            out.update(result.metrics(prefix))
        return out

    def markdown(self) -> str:
        return markdown_table(self.benchmarks)

    def to_dict(self) -> dict[str, Any]:
        return {"benchmarks": {r.name: r.to_dict() for r in self.benchmarks}, "settings": self.settings}


def sampling_params(sampled: bool, cfg: EvalConfig, stops: Sequence[int], seed: int) -> SamplingParams:
    """Sampled: ``cfg.samples`` responses at ``cfg.temperature``/``cfg.top_p``; greedy: one response, top_k=1."""
    if sampled:
        return SamplingParams(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, stop_token_ids=tuple(stops), seed=seed)
    return SamplingParams(n=1, top_k=1, max_new_tokens=cfg.max_new_tokens, stop_token_ids=tuple(stops), seed=seed)


def _generate(generate: Generate, prompts: list[Prompt], params: SamplingParams, batch_size: int,
              label: str) -> list[Completion]:
    from tqdm import tqdm

    out: list[Completion] = []
    bar = tqdm(total=len(prompts), desc=f"eval {label}", unit="problem", disable=not sys.stderr.isatty())
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        completions = generate([list(p.token_ids) for p in chunk], params)
        if len(completions) != len(chunk) * params.n:
            raise RuntimeError(
                f"engine returned {len(completions)} completions for {len(chunk)} prompts x n={params.n}"
            )
        for c in completions:
            c.prompt_index += start
        out.extend(completions)
        bar.update(len(chunk))
    bar.close()
    return out


@dataclass(frozen=True)
class GradedResponse:
    """One graded response of a benchmark (``problem`` indexes the benchmark's full prompt list)."""

    problem: int
    sample: int
    text: str
    score: float
    reason: str
    extracted: str | None
    tokens: int
    finish_reason: str


Generate = Callable[[list[list[int]], SamplingParams], list[Completion]]
"""``(prompt token lists, params) -> completions`` (an engine's ``generate``)."""


def generate_and_grade(prompts: Sequence[Prompt], generate: Generate, params: SamplingParams, tokenizer: Any,
                       scorer: RewardScorer, *, batch_size: int, label: str, shard: tuple[int, int] = (0, 1)
                       ) -> list[GradedResponse]:
    """Generate ``params.n`` responses for this shard's problems and grade them.

    Args:
        shard: ``(index, count)``: this caller takes problems ``index::count`` (data-parallel ranks split a
            benchmark; their results together are every problem's); ``(0, 1)`` = all.
    """
    index, count = shard
    mine = list(range(index, len(prompts), count))
    completions = _generate(generate, [prompts[i] for i in mine], params, batch_size, label)
    texts = [c.text or decode(tokenizer, c.response_ids) for c in completions]
    results = scorer.score(texts, [prompts[mine[c.prompt_index]].ground_truth for c in completions])
    return [GradedResponse(problem=mine[c.prompt_index], sample=c.sample_index, text=text, score=res.score,
                           reason=res.reason, extracted=res.extracted, tokens=len(c.response_ids),
                           finish_reason=c.finish_reason)
            for c, text, res in zip(completions, texts, results)]


def fold(request: BenchmarkRequest, num_problems: int, graded: Sequence[GradedResponse], params: SamplingParams,
         seconds: float = 0.0) -> BenchmarkResult:
    """A :class:`BenchmarkResult` from every problem's graded responses (all shards together).

    Raises:
        ValueError: a problem lacks some of its ``params.n`` responses.
    """
    scores: list[list[float | None]] = [[None] * params.n for _ in range(num_problems)]
    for g in graded:
        scores[g.problem][g.sample] = g.score
    if any(x is None for row in scores for x in row):
        raise ValueError(f"{request.name}: {sum(x is None for r in scores for x in r)} responses are missing")
    return summarize(
        request.name, mode="sampled" if request.spec.sampled else "greedy", k=params.n, scores=scores,
        lengths=[g.tokens for g in graded], truncated=[g.finish_reason == "length" for g in graded],
        reasons=[g.reason for g in graded], temperature=params.temperature if request.spec.sampled else None,
        seconds=seconds,
    )


def _run_one(request: BenchmarkRequest, prompts: list[Prompt], engine: RolloutEngine, tokenizer: Any,
             scorer: RewardScorer, cfg: EvalConfig, seed: int, gen_dir: Path) -> BenchmarkResult:
    start = time.monotonic()
    params = sampling_params(request.spec.sampled, cfg, stop_token_ids(tokenizer), seed)
    graded = generate_and_grade(prompts, engine.generate, params, tokenizer, scorer, batch_size=cfg.batch_size,
                                label=request.name)
    with open(gen_dir / f"{request.name}.jsonl", "w") as fh:
        for g in graded:
            prompt = prompts[g.problem]
            fh.write(json.dumps({
                "benchmark": request.name, "id": prompt.id, "sample": g.sample, "prompt": prompt.text,
                "response": g.text, "ground_truth": prompt.ground_truth, "extracted": g.extracted,
                "score": g.score, "reason": g.reason, "response_tokens": g.tokens, "finish_reason": g.finish_reason,
            }) + "\n")
    return fold(request, len(prompts), graded, params, time.monotonic() - start)


def load_requests(benchmarks: Sequence[str], cfg: EvalConfig, tokenizer: Any, data_cfg: DataConfig
                  ) -> list[tuple[BenchmarkRequest, list[Prompt]]]:
    """Parse ``benchmarks`` and load each one's prompts with the eval template (``data`` = ``data_cfg.template``).

    Raises:
        ValueError / FileNotFoundError: bad names, missing files or columns.
    """
    template = data_cfg.template if cfg.template == "data" else cfg.template
    return [(r, load_benchmark(r, tokenizer, data_dir=cfg.data_dir, template=template, instruction=cfg.instruction,
                               data_cfg=data_cfg)) for r in parse_benchmarks(list(benchmarks))]


def math_grader(reward_cfg: RewardConfig | None) -> RewardConfig:
    """Benchmarks are always graded with the ``math`` reward, with the run's deadline and worker count."""
    reward_cfg = reward_cfg or RewardConfig()
    return RewardConfig(name="math", timeout_s=reward_cfg.timeout_s, num_workers=reward_cfg.num_workers)


def evaluate(engine: RolloutEngine, tokenizer: Any, benchmarks: Sequence[str], cfg: EvalConfig,
             out_dir: str | Path, *, data_cfg: DataConfig | None = None, reward_cfg: RewardConfig | None = None,
             seed: int = 0) -> EvalResults:
    """Evaluate ``engine`` on ``benchmarks`` and write the reports.

    Args:
        engine: any :class:`~megatron_lpreg.rollout.base.RolloutEngine`.
        tokenizer: the model's tokenizer (templates, stop ids, decoding when the engine returns no text).
        benchmarks: names (see :data:`~megatron_lpreg.eval.benchmarks.BENCHMARKS`) or ``name=path``.
        cfg: eval settings (samples, temperature, max_new_tokens, template, data_dir).
        out_dir: where results.json, results.md and generations/ go (created).
        data_cfg: the training data config: template when ``cfg.template == 'data'`` and the synthetic split.
        reward_cfg: deadline and workers for grading (the grader is always ``math``).
        seed: sampling seed.

    Returns:
        The results (also written to disk).

    Raises:
        ValueError / FileNotFoundError: bad benchmark names, missing files or columns, invalid config.
    """
    cfg.validate()
    data_cfg = data_cfg or DataConfig()
    template = data_cfg.template if cfg.template == "data" else cfg.template
    # load everything first: a missing file should fail before any generation time is spent
    loaded = load_requests(benchmarks, cfg, tokenizer, data_cfg)
    out = Path(out_dir)
    (out / "generations").mkdir(parents=True, exist_ok=True)
    results = []
    with RewardScorer(math_grader(reward_cfg)) as scorer:
        for request, prompts in loaded:
            result = _run_one(request, prompts, engine, tokenizer, scorer, cfg, seed, out / "generations")
            logger.info("eval %s: accuracy %.3f (%s, k=%d, %d problems, %.1f s)", result.name, result.accuracy,
                        result.mode, result.k, result.num_problems, result.seconds)
            results.append(result)
    settings = {"template": template, "samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens, "seed": seed, "data_dir": cfg.data_dir,
                "benchmarks": [r.name for r, _ in loaded]}
    report = EvalResults(benchmarks=results, settings=settings, out_dir=out)
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / "results.md").write_text(report.markdown())
    return report
