"""``evaluate``: generate with any rollout engine, grade with the math reward, write results and raw generations.

Outputs in ``out_dir``: ``results.json`` (per benchmark numbers + settings), ``results.md`` (a table) and
``generations/<benchmark>.jsonl`` (one line per response: prompt, response, ground truth, score, reason).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.data.records import Prompt
from megatron_lpreg.data.templates import decode, stop_token_ids
from megatron_lpreg.eval.benchmarks import BenchmarkRequest, load_benchmark, parse_benchmarks
from megatron_lpreg.eval.scoring import BenchmarkResult, markdown_table, summarize
from megatron_lpreg.reward.registry import RewardScorer
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


def _generate(engine: RolloutEngine, prompts: list[Prompt], params: SamplingParams, batch_size: int,
              label: str) -> list[Completion]:
    from tqdm import tqdm

    out: list[Completion] = []
    bar = tqdm(total=len(prompts), desc=f"eval {label}", unit="problem", disable=not sys.stderr.isatty())
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        completions = engine.generate([list(p.token_ids) for p in chunk], params)
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


def _run_one(request: BenchmarkRequest, prompts: list[Prompt], engine: RolloutEngine, tokenizer: Any,
             scorer: RewardScorer, cfg: EvalConfig, seed: int, gen_dir: Path) -> BenchmarkResult:
    start = time.monotonic()
    params = sampling_params(request.spec.sampled, cfg, stop_token_ids(tokenizer), seed)
    completions = _generate(engine, prompts, params, cfg.batch_size, request.name)
    texts = [c.text or decode(tokenizer, c.response_ids) for c in completions]
    results = scorer.score(texts, [prompts[c.prompt_index].ground_truth for c in completions])
    scores: list[list[float]] = [[0.0] * params.n for _ in prompts]
    with open(gen_dir / f"{request.name}.jsonl", "w") as fh:
        for comp, text, res in zip(completions, texts, results):
            scores[comp.prompt_index][comp.sample_index] = res.score
            prompt = prompts[comp.prompt_index]
            fh.write(json.dumps({
                "benchmark": request.name, "id": prompt.id, "sample": comp.sample_index, "prompt": prompt.text,
                "response": text, "ground_truth": prompt.ground_truth, "extracted": res.extracted,
                "score": res.score, "reason": res.reason, "response_tokens": len(comp.response_ids),
                "finish_reason": comp.finish_reason,
            }) + "\n")
    return summarize(
        request.name, mode="sampled" if request.spec.sampled else "greedy", k=params.n, scores=scores,
        lengths=[len(c.response_ids) for c in completions],
        truncated=[c.finish_reason == "length" for c in completions], reasons=[r.reason for r in results],
        temperature=params.temperature if request.spec.sampled else None, seconds=time.monotonic() - start,
    )


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
    requests = parse_benchmarks(list(benchmarks))
    # load everything first: a missing file should fail before any generation time is spent
    loaded = [(r, load_benchmark(r, tokenizer, data_dir=cfg.data_dir, template=template,
                                 instruction=cfg.instruction, data_cfg=data_cfg)) for r in requests]
    out = Path(out_dir)
    (out / "generations").mkdir(parents=True, exist_ok=True)
    grader = RewardConfig(name="math", timeout_s=(reward_cfg or RewardConfig()).timeout_s,
                          num_workers=(reward_cfg or RewardConfig()).num_workers)
    results = []
    with RewardScorer(grader) as scorer:
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
