"""Custom benchmarks can be sampled (avg@k / pass@k): ``name@sampled=path`` (issue 20, diagnostics)."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lpreg.config.data import EvalConfig
from megatron_lpreg.eval import parse_benchmarks
from megatron_lpreg.eval.runner import sampling_params


def test_custom_benchmark_modes():
    plain, sampled, greedy_known = parse_benchmarks(["mine=/d/a.jsonl", "spark@sampled=/d/b.jsonl",
                                                     "aime24@greedy=/d/c.jsonl"])
    assert not plain.spec.sampled and sampled.spec.sampled and sampled.name == "spark"
    assert sampled.path == Path("/d/b.jsonl") and not greedy_known.spec.sampled
    assert greedy_known.spec.file_stems == ("aime24", "aime_2024", "aime2024")
    params = sampling_params(sampled.spec.sampled, EvalConfig(samples=8, temperature=1.0), [2], seed=0)
    assert params.n == 8 and params.temperature == 1.0
    with pytest.raises(ValueError, match="mode 'often' unknown"):
        parse_benchmarks(["x@often=/d/a.jsonl"])
