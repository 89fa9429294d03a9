"""Benchmark evaluation (AIME24/25 avg@k, MATH-500, Minerva, OlympiadBench, synthetic) and the
``megatron-lpreg eval`` CLI (:mod:`megatron_lpreg.eval.cli`). See docs/eval.md."""
from megatron_lpreg.eval.benchmarks import BENCHMARKS, BenchmarkSpec, find_benchmark_file, parse_benchmarks
from megatron_lpreg.eval.runner import EvalResults, evaluate, sampling_params
from megatron_lpreg.eval.scoring import BenchmarkResult, markdown_table, pass_at_k, summarize

__all__ = [
    "BENCHMARKS", "BenchmarkResult", "BenchmarkSpec", "EvalResults", "evaluate", "find_benchmark_file",
    "markdown_table", "parse_benchmarks", "pass_at_k", "sampling_params", "summarize",
]
