"""The exploration diagnostics through the real trainer (``megatron-lpreg train``): a ``diagnostics:`` section makes
every metrics.jsonl row carry ``diag/*`` and ``entropy/first_token``; the Lp-Reg selections by class are the loss's
own (their sum equals ``lpreg/num_regularized``); counts are whole numbers, so they were summed, not averaged.
Without the section no ``diag/*`` key appears (the computed numbers are checked on hand-built batches in
tests/metrics/test_diagnostics.py)."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.cli import main as cli_main
from megatron_lpreg.config import DiagnosticsConfig, RunConfig
from megatron_lpreg.metrics.diagnostics import HISTOGRAM_EDGES
from megatron_lpreg.trainer.cli import materialize_tiny

TINY = "configs/tiny_cpu.yaml"
BINS = len(HISTOGRAM_EDGES)
SHORT = ["trainer.max_steps=2", "trainer.world_size=1", "parallel.tp=1", "rollout.prompts_per_step=4", "rollout.n=4",
         "eval.benchmarks=[]", "reward.name=tests.support.rewards:even_length", "algo.rho=0.3"]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _spark_word() -> tuple[str, frozenset[int]]:
    """A word that is one token for the run's tokenizer (configs/tiny_cpu.yaml's ``tiny:0``), and the ids its
    forms resolve to."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize_tiny(RunConfig.load(TINY).model))
    for word in ("the", "and", "is", "a"):
        if len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1:
            return word, DiagnosticsConfig(spark_strings=[word]).resolve(tokenizer).spark
    raise AssertionError("no single-token word in the tiny tokenizer")


def test_train_logs_diag_metrics(tmp_path):
    word, word_ids = _spark_word()
    # a random tiny model samples ~uniformly over 512 ids: half of them as noise make the fractions non-trivial
    noise = [i for i in range(256, 512) if i not in word_ids]
    out = tmp_path / "run"
    code = cli_main(["train", TINY, f"trainer.output_dir={out}",
                     *SHORT, f"diagnostics.spark_strings=[{word}]", f"diagnostics.spark_ids=[{min(word_ids)}]",
                     f"diagnostics.noise_ids={noise}"])
    assert code == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        tokens = r["rollout/tokens"]
        for key in ("spark_first_frac", "noise_first_frac", "spark_token_frac", "noise_token_frac",
                    "spark_negative_frac"):
            assert 0.0 <= r[f"diag/{key}"] <= 1.0, key
        assert 0.2 < r["diag/noise_token_frac"] < 0.8  # ~half of uniform samples
        assert (r["diag/noise_token_frac"] * tokens) == pytest.approx(round(r["diag/noise_token_frac"] * tokens))
        assert (r["diag/noise_first_frac"] * 16) == pytest.approx(round(r["diag/noise_first_frac"] * 16))
        hist = [r[f"diag/hist_pos_{i}"] for i in range(BINS)] + [r[f"diag/hist_neg_{i}"] for i in range(BINS)]
        assert all(h == int(h) for h in hist) and 0 < sum(hist) <= tokens
        assert r["entropy/first_token"] > 0.0
        selected = [r[f"diag/lpreg_selected_{c}"] for c in ("other", "main", "spark", "noise")]
        assert sum(selected) == pytest.approx(r["lpreg/num_regularized"]) and sum(selected) > 0
        assert r["diag/lpreg_kl_cancel"] >= 0.0


def test_no_diagnostics_section_no_diag_keys(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", TINY, f"trainer.output_dir={out}", *SHORT]) == 0
    for r in _rows(out):
        assert not [k for k in r if k.startswith("diag/")]
        assert r["entropy/first_token"] > 0.0  # always logged, it is cheap


def test_dp2_counts_are_summed_over_ranks(tmp_path):
    """Two DP ranks: the histograms are whole-step counts (summed over ranks, then left as they are by the DP mean),
    so they add up to more than one rank's share of the tokens (``rollout/tokens`` is the per-rank mean); averaged
    counts could not."""
    out = tmp_path / "run"
    args = [a for a in SHORT if not a.startswith(("trainer.world_size", "rollout.prompts_per_step"))]
    assert cli_main(["train", TINY, f"trainer.output_dir={out}", *args, "trainer.world_size=2",
                     "rollout.prompts_per_step=8", "diagnostics.noise_ids=[300, 301, 302]",
                     f"diagnostics.spark_ids={list(range(256))}"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        hist = [r[f"diag/hist_{s}_{i}"] for s in ("pos", "neg") for i in range(BINS)]
        assert all(h == int(h) for h in hist)
        assert r["rollout/tokens"] < sum(hist) <= 2 * r["rollout/tokens"]
        global_tokens = 2 * r["rollout/tokens"]
        assert r["diag/spark_token_frac"] * global_tokens == pytest.approx(round(r["diag/spark_token_frac"]
                                                                                 * global_tokens))
        assert r["diag/spark_first_frac"] * 32 == pytest.approx(round(r["diag/spark_first_frac"] * 32))


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "packed": ["trainer.packing=true"],
    "global_offpolicy": ["algo.selection=global", "trainer.updates_per_step=2"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_side_diag_across_layouts(tmp_path, layout):
    """TP2 (vocab-parallel stats, reduced before the metrics), PP2 (only the last stage computes the loss),
    packed micro-batches (stats unpacked into rows first) and global selection off-policy (the step's threshold,
    two updates): the loss-side keys arrive on rank 0 and the class counts still add up to the loss's
    ``lpreg/num_regularized``."""
    out = tmp_path / "run"
    args = [a for a in SHORT if not a.startswith(("trainer.world_size", "parallel.tp"))]
    assert cli_main(["train", TINY, f"trainer.output_dir={out}", *args, "trainer.world_size=2", "parallel.tp=1",
                     *LAYOUTS[layout], f"diagnostics.spark_ids={list(range(256))}"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        selected = [r[f"diag/lpreg_selected_{c}"] for c in ("other", "main", "spark", "noise")]
        assert sum(selected) == pytest.approx(r["lpreg/num_regularized"]) and sum(selected) > 0
        assert r["entropy/first_token"] > 0.0 and 0.0 < r["diag/spark_token_frac"] < 1.0
