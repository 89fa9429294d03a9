from __future__ import annotations

import math

import pytest

from megatron_lpreg.eval.scoring import markdown_table, pass_at_k, summarize


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))  # 5/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(16, 1, 1) == pytest.approx(1 / 16)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summarize_and_table():
    res = summarize("aime24", mode="sampled", k=4, scores=[[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]],
                    lengths=[10] * 12, truncated=[True] + [False] * 11, reasons=["match"] * 12, temperature=0.6)
    assert (res.avg_at_k, res.accuracy) == (0.5, 0.5)
    assert res.pass_at_k == pytest.approx(2 / 3)
    assert res.truncated_frac == pytest.approx(1 / 12)
    assert res.metrics() == {"eval/aime24/accuracy": 0.5, "eval/aime24/avg@4": 0.5,
                             "eval/aime24/pass@4": pytest.approx(2 / 3), "eval/aime24/mean_tokens": 10.0}
    assert "| aime24 | sampled | 3 | 4 | 50.0 | 50.0 | 66.7 | 10.0 | 8.3% |" in markdown_table([res])
    with pytest.raises(ValueError, match="k=4"):
        summarize("x", mode="greedy", k=4, scores=[[1]], lengths=[1], truncated=[False], reasons=["match"])
