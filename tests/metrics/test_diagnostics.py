"""metrics/diagnostics.py: token classes by id and by string (the tiny model's tokenizer), decision probes,
sampled-probability histograms, selections by class, and the per-step trainer metrics (``diag/*``,
``entropy/first_token``) on hand-built batches with known answers (float64 where numbers are computed)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.metrics.diagnostics import (
    DiagnosticsConfig,
    TokenClasses,
    classify_tokens,
    decision_probe,
    first_response_positions,
    first_token_entropy,
    kl_cancel_fraction,
    lpreg_class_metrics,
    rollout_class_counts,
    rollout_class_metrics,
    sampled_prob_histogram,
    selections_by_class,
)
from megatron_lpreg.trainer.batch import build_train_batch


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


# ---- per-step trainer metrics --------------------------------------------------------------------------------
SPARK, NOISE = 3, 4
CLASSES = TokenClasses(spark=frozenset({SPARK}), noise=frozenset({NOISE}))


def _hand_batch():
    """Four responses after a 2-token prompt: (tokens, advantage, sampling probabilities)."""
    rows = [([SPARK, 5, 6], 1.0, [0.5, 0.05, 2e-7]),
            ([NOISE, SPARK, 7], -1.0, [0.005, 0.3, 0.9]),
            ([5], -1.0, [1.0]),
            ([SPARK, SPARK], 0.0, [0.2, 0.4])]
    return build_train_batch([[10, 11]] * len(rows), [r[0] for r in rows],
                             [[math.log(p) for p in r[2]] for r in rows], [r[1] for r in rows], pad_id=0)


def test_rollout_class_metrics_on_a_hand_built_batch():
    batch = _hand_batch()
    counts = rollout_class_counts(batch.targets, batch.loss_mask, batch.advantages, batch.engine_logprobs, CLASSES)
    got = rollout_class_metrics(counts)
    assert got["diag/spark_first_frac"] == 2 / 4 and got["diag/noise_first_frac"] == 1 / 4
    assert got["diag/spark_token_frac"] == pytest.approx(4 / 9) and got["diag/noise_token_frac"] == pytest.approx(1 / 9)
    assert got["diag/spark_negative_frac"] == 1 / 4  # row 1's spark; row 3 (A = 0) is neither sign
    # positive: 2e-7 -> bin 0, 0.05 -> bin 5, 0.5 -> bin 6; negative: 0.005 -> bin 4, 0.3 / 0.9 / 1.0 -> bin 6
    assert [got[f"diag/hist_pos_{i}"] for i in range(7)] == [1, 0, 0, 0, 0, 1, 1]
    assert [got[f"diag/hist_neg_{i}"] for i in range(7)] == [0, 0, 0, 0, 1, 0, 3]


def test_rollout_counts_add_over_data_parallel_slices():
    """Counts of two DP slices summed give the whole batch's metrics (what the trainer all-reduces); the mean of
    the slices' own fractions would not (4/9 overall vs mean(2/6, 2/3) = 1/2 for spark tokens)."""
    batch = _hand_batch()
    args = lambda b: (b.targets, b.loss_mask, b.advantages, b.engine_logprobs, CLASSES)  # noqa: E731
    halves = [rollout_class_counts(*args(batch.select(s))) for s in (slice(0, 2), slice(2, 4))]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert rollout_class_metrics(summed) == rollout_class_metrics(rollout_class_counts(*args(batch)))
    per_slice = [rollout_class_metrics(h)["diag/spark_token_frac"] for h in halves]
    assert sum(per_slice) / 2 != pytest.approx(4 / 9)


def test_no_class_and_no_spark_give_zeros_not_nan():
    batch = _hand_batch()
    empty = TokenClasses(spark=frozenset(), noise=frozenset())
    got = rollout_class_metrics(rollout_class_counts(batch.targets, batch.loss_mask, batch.advantages,
                                                     batch.engine_logprobs, empty))
    assert got["diag/spark_token_frac"] == 0.0 and got["diag/spark_negative_frac"] == 0.0


def test_first_token_entropy_skips_rows_without_a_response():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    entropy = torch.tensor([[9.0, 1.0, 8.0, 9.0], [9.0, 9.0, 2.0, 7.0], [5.0, 5.0, 5.0, 5.0]])
    rows, positions = first_response_positions(mask)
    assert rows.tolist() == [0, 1] and positions.tolist() == [1, 2]
    assert first_token_entropy(entropy, mask) == 1.5
    assert first_token_entropy(entropy, torch.zeros_like(mask)) is None


def test_kl_cancel_on_policy_is_m_over_one_minus_m():
    """One regularised token on-policy: the proxy renormalises away mass m, so d = -log(1 - m) and the k3 term's
    gradient cancels m / (1 - m) of the push-down |A| = 1."""
    m = 0.2
    lp = torch.tensor([[math.log(0.05)]], dtype=torch.float64)
    proxy = lp - math.log(1 - m)
    chosen = torch.tensor([[True]])
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    assert kl_cancel_fraction(lp, lp, proxy, adv, chosen) == pytest.approx(m / (1 - m), rel=1e-12)
    assert kl_cancel_fraction(lp, lp, proxy, adv, torch.tensor([[False]])) == 0.0


def test_lpreg_class_metrics_are_the_losses_own_selection():
    """rho = 1 selects every candidate (A < 0, in the mask); those with logprob < proxy are regularised: all of
    rows 1 and 2 here, i.e. noise 1, spark 1 and other 2 (row 1's 7, row 2's 5); the loss counts the same 4.
    Then random micro-batches in both selection modes: the class counts add up to the loss's own count."""
    from megatron_lpreg.algo.lpreg import lpreg_policy_loss

    batch = _hand_batch()
    lp = batch.engine_logprobs.double()
    proxy = torch.where(batch.loss_mask > 0, lp + 0.1, lp)  # every valid token below its proxy
    adv = batch.advantages.double()
    got = lpreg_class_metrics(lp, lp, proxy, adv, batch.loss_mask, batch.targets, CLASSES, rho=1.0, beta=1.0)
    assert {k: v for k, v in got.items() if "selected" in k} == {
        "diag/lpreg_selected_other": 2.0, "diag/lpreg_selected_main": 0.0, "diag/lpreg_selected_spark": 1.0,
        "diag/lpreg_selected_noise": 1.0}
    _, loss_metrics = lpreg_policy_loss(lp, lp, proxy, adv, batch.loss_mask, rho=1.0, clip_low=0.2, clip_high=0.2)
    assert loss_metrics["lpreg/num_regularized"] == 4
    # d = 0.1 on each of the 4: cancel = 4 (exp(0.1) - 1) / (4 |A|)
    assert got["diag/lpreg_kl_cancel"] == pytest.approx(math.exp(0.1) - 1, rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for selection, threshold in (("reference", None), ("global", math.log(0.5))):
        lp = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 5
        proxy = lp + torch.randn(4, 6, generator=gen, dtype=torch.float64)
        adv = torch.randn(4, 1, generator=gen, dtype=torch.float64).expand(4, 6)
        mask, targets = torch.ones(4, 6), torch.randint(0, 8, (4, 6), generator=gen)
        got = lpreg_class_metrics(lp, lp, proxy, adv, mask, targets, CLASSES, rho=0.5, beta=1.0,
                                  selection=selection, lowprob_threshold=threshold, with_kl_cancel=False)
        _, loss_metrics = lpreg_policy_loss(lp, lp, proxy, adv, mask, rho=0.5, clip_low=0.2, clip_high=0.2,
                                            selection=selection, lowprob_threshold=threshold)
        assert sum(got.values()) == loss_metrics["lpreg/num_regularized"] > 0, selection
        assert "diag/lpreg_kl_cancel" not in got
