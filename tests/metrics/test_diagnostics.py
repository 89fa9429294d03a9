"""metrics/diagnostics.py: token classes by id and by string (the tiny model's tokenizer), decision probes,
sampled-probability histograms and selections by class."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.metrics.diagnostics import (
    DiagnosticsConfig,
    TokenClasses,
    classify_tokens,
    decision_probe,
    sampled_prob_histogram,
    selections_by_class,
)


def test_strings_resolve_through_the_tokenizer(tiny_qwen2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    word = next(w for w in ("the", "and", "is") if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1)
    classes = DiagnosticsConfig(spark_strings=[word], noise_ids=[7]).resolve(tokenizer)
    assert tokenizer.encode(" " + word, add_special_tokens=False)[0] in classes.spark and classes.noise == {7}
    with pytest.raises(ValueError, match="needs a tokenizer"):
        DiagnosticsConfig(spark_strings=["wait"]).resolve(None)
    with pytest.raises(ValueError, match="not a single token"):
        DiagnosticsConfig(spark_strings=["zqxjzqxjzqxj"]).resolve(tokenizer)
    with pytest.raises(ValueError, match="both spark_ids and noise_ids"):
        DiagnosticsConfig(spark_ids=[3], noise_ids=[3]).resolve()


def test_decision_probe_on_a_known_distribution():
    probs = torch.tensor([[0.70, 0.05, 0.01, 0.004, 0.236]], dtype=torch.float64)
    classes = TokenClasses(spark=frozenset({1}), noise=frozenset({2, 3}))
    probe = decision_probe(probs.log(), classes, kappa=0.02)
    assert probe["probe/p_main"] == pytest.approx(0.70) and probe["probe/p_spark"] == pytest.approx(0.05)
    assert probe["probe/p_noise"] == pytest.approx(0.014)
    assert probe["probe/mass_below_cut"] == pytest.approx(0.014)  # 0.01 and 0.004 < 0.02 * 0.7 = 0.014
    assert probe["probe/noise_max_rel"] == pytest.approx(0.01 / 0.70)
    assert probe["probe/entropy"] == pytest.approx(float(-(probs * probs.log()).sum()))


def test_histogram_splits_positive_and_negative_samples():
    logp = torch.tensor([[math.log(0.5), math.log(0.05), math.log(2e-7), math.log(0.5)]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 0.0]])
    hist = sampled_prob_histogram(logp, adv, torch.ones_like(logp))
    assert sum(hist["positive"]) == 1 and sum(hist["negative"]) == 2
    assert hist["positive"][6] == 1 and hist["negative"][5] == 1 and hist["negative"][0] == 1


def test_selections_and_classes():
    tokens = torch.tensor([[5, 1, 2, 9]])
    classes = TokenClasses(spark=frozenset({1}), noise=frozenset({2}), main=frozenset({5}))
    assert classify_tokens(tokens, classes).tolist() == [[1, 2, 3, 0]]
    counts = selections_by_class(torch.tensor([[False, True, True, True]]), tokens, classes)
    assert counts == {"lpreg_class/other": 1.0, "lpreg_class/main": 0.0, "lpreg_class/spark": 1.0,
                      "lpreg_class/noise": 1.0}
