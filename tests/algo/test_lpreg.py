"""Lp-Reg loss: hand-computed micro-batches, a literal per-token transcription of the spec in float64, the global
threshold over gloo data-parallel ranks, and the single-process proxy vs the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.lpreg import (
    compute_proxy_logprobs,
    global_lowprob_threshold,
    lowprob_candidates,
    lpreg_policy_loss,
)
from megatron_lpreg.ops.reference import reference_logprob_stats
from megatron_lpreg.parallel.spawn import run_ranks

E = math.e
AUTHORS_CLIP = {"clip_low": 1.0, "clip_high": 9.0}


def _row(*values, dtype=torch.float32):
    return torch.tensor([values], dtype=dtype)


def _batch():
    """Five tokens, on-policy (ratio 1); candidates are the four with A = -1."""
    lp = _row(-3.0, -1.0, -0.5, -2.0, -0.1).requires_grad_()
    proxy = _row(-2.0, -1.5, -0.2, -2.5, 0.0)
    adv = _row(-1.0, -1.0, -1.0, -1.0, 1.0)
    mask = torch.ones(1, 5)
    return lp, proxy, adv, mask


def test_hand_case_regularizes_lowest_token_below_proxy():
    lp, proxy, adv, mask = _batch()
    loss, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, mask, rho=0.5, **AUTHORS_CLIP)
    # k = int(4 * 0.5) = 2 -> lowest lp: tokens 0 (-3) and 3 (-2); only token 0 has lp < proxy.
    # token 0: -A r + (e^d - d - 1), d = 1 -> 1 + e - 2; tokens 1-3: 1; token 4: -1.
    assert loss.item() == pytest.approx((1 + E - 2 + 1 + 1 + 1 - 1) / 5, rel=1e-6)
    loss.backward()
    # d/dlp: -A r = 1 (A=-1) or -1, plus beta (1 - e^d) on the regularized token.
    expected = torch.tensor([[1 + 1 - E, 1, 1, 1, -1]]) / 5
    torch.testing.assert_close(lp.grad, expected)
    assert metrics["lpreg/num_candidates"] == 4 and metrics["lpreg/k"] == 2
    assert metrics["lpreg/num_selected"] == 2 and metrics["lpreg/num_regularized"] == 1
    assert metrics["lpreg/reg_prob_mean"] == pytest.approx(math.exp(-3.0), rel=1e-6)


@pytest.mark.parametrize("rho, regularized", [(0.25, 0), (0.49, 0), (0.5, 1)])
def test_k_rule_needs_k_above_one(rho, regularized):
    lp, proxy, adv, mask = _batch()
    loss, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, mask, rho=rho, **AUTHORS_CLIP)
    assert metrics["lpreg/num_regularized"] == regularized
    if not regularized:
        assert loss.item() == pytest.approx(3 / 5)


def test_all_positive_advantages_and_masked_tokens():
    lp, proxy, adv, mask = _batch()
    _, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv.abs(), mask, rho=1.0, **AUTHORS_CLIP)
    assert metrics["lpreg/num_candidates"] == 0 and metrics["lpreg/num_regularized"] == 0
    # Masking token 0 (the lowest): it neither counts nor gets selected; k = int(3 * 0.7) = 2 -> tokens 3 and 1,
    # token 1 has lp -1 < proxy -1.5? no; token 3: -2 < -2.5? no -> nothing regularized.
    mask = _row(0.0, 1.0, 1.0, 1.0, 1.0)
    loss, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, mask, rho=0.7, **AUTHORS_CLIP)
    assert metrics["lpreg/num_candidates"] == 3 and metrics["lpreg/num_regularized"] == 0
    assert loss.item() == pytest.approx((1 + 1 + 1 - 1) / 4)


def test_filtered_tokens_never_regularized():
    lp, proxy, adv, mask = _batch()
    proxy = torch.full_like(proxy, -1e4 - 1.3)
    _, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, mask, rho=1.0, **AUTHORS_CLIP)
    assert metrics["lpreg/num_selected"] == 4 and metrics["lpreg/num_regularized"] == 0


def test_clipped_surrogate_and_unclipped_ratio_on_regularized_tokens():
    lp = _row(math.log(1.5), math.log(0.5), -4.0, -5.0).requires_grad_()
    old = _row(0.0, 0.0, -4.0 - math.log(0.5), -5.0)
    proxy = _row(0.0, -2.0, -1.0, -9.0)
    adv = _row(1.0, -1.0, -2.0, -2.0)
    loss, metrics = lpreg_policy_loss(lp, old, proxy, adv, torch.ones(1, 4), rho=1.0, clip_low=0.2, clip_high=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); k = int(3*1) = 3 selects
    # tokens 1, 2, 3; token 1 has lp >= proxy; token 2 (lp -4 < proxy -1) is regularized with r = 0.5 unclipped:
    # 2*0.5 + (e^3 - 3 - 1) -> clamp 10; token 3: lp -5 >= proxy -9, plain surrogate 2*1 = 2.
    expected = (-1.2 + 0.8 + (1.0 + 10.0) + 2.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # clipped tokens and the clamped regularizer give no gradient beyond -A r on token 2.
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 2 * 0.5, 2.0]]) / 4)
    # clip fraction is measured on the surrogate before replacement (token 2's clamped branch is larger too).
    assert metrics["actor/clipfrac"] == pytest.approx(0.75)


def test_huge_gap_gives_finite_gradients():
    lp = _row(-120.0, -200.0, -1.0, -2.0).requires_grad_()
    proxy = _row(-0.1, -0.1, -0.1, -0.1)
    adv = -torch.ones(1, 4)
    loss, _ = lpreg_policy_loss(lp, lp.detach(), proxy, adv, torch.ones(1, 4), rho=0.5, **AUTHORS_CLIP)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_empty_micro_batch():
    lp, proxy, adv, _ = _batch()
    loss, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, torch.zeros(1, 5), rho=1.0, **AUTHORS_CLIP)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0) and metrics["lpreg/num_candidates"] == 0


def _spec_loss(lp, old, proxy, adv, mask, rho, beta, clip_low, clip_high):
    """The spec's steps 1-6, token by token in float64 (plain Python selection)."""
    lp64, old64, proxy64, adv64 = (t.to(torch.float64) for t in (lp, old, proxy, adv))
    cells = [(b, t) for b in range(lp.shape[0]) for t in range(lp.shape[1])]
    cand = [c for c in cells if mask[c] > 0 and adv64[c] < 0]
    k = max(1, int(len(cand) * rho))
    selected = set(sorted(cand, key=lambda c: lp64[c].item())[:k]) if k > 1 else set()
    total, count = 0.0, 0
    for c in cells:
        if mask[c] <= 0:
            continue
        r = torch.exp(lp64[c] - old64[c])
        term = torch.maximum(-adv64[c] * r, -adv64[c] * torch.clamp(r, 1 - clip_low, 1 + clip_high))
        if c in selected and lp64[c].item() < proxy64[c].item():
            d = proxy64[c] - lp64[c]
            term = -adv64[c] * r + beta * torch.clamp(torch.exp(d) - d - 1, -10, 10)
        total, count = total + term, count + 1
    return total / count if count else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("seed, rho", [(0, 0.1), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_reference_mode_matches_literal_spec(seed, rho):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 11)
    lp = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    old = lp.detach() + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
    proxy = lp.detach() + torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    adv = torch.randn(3, 1, generator=gen, dtype=torch.float64).expand(shape)
    mask = (torch.rand(shape, generator=gen) < 0.8).double()
    loss, _ = lpreg_policy_loss(lp, old, proxy, adv, mask, rho=rho, beta=0.7, clip_low=0.2, clip_high=0.28)
    want_leaf = lp.detach().clone().requires_grad_()
    want = _spec_loss(want_leaf, old, proxy, adv, mask, rho, 0.7, 0.2, 0.28)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    (want_grad,) = torch.autograd.grad(want, want_leaf)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


def test_global_mode_uses_threshold_on_old_logprobs_and_exact_kl():
    lp, proxy, adv, mask = _batch()
    old = lp.detach().clone()
    kl = _row(0.3, 0.3, 0.3, 0.3, 0.3).requires_grad_()
    loss, metrics = lpreg_policy_loss(
        lp, old, proxy, adv, mask, rho=0.0, **AUTHORS_CLIP, selection="global", lowprob_threshold=-1.0, proxy_kl=kl
    )
    # old <= -1 selects candidates 0, 1, 3; lp < proxy only for token 0; its term is 1 + beta * 0.3.
    assert metrics["lpreg/num_selected"] == 3 and metrics["lpreg/num_regularized"] == 1
    assert loss.item() == pytest.approx((1.3 + 1 + 1 + 1 - 1) / 5)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([[0.2, 0.0, 0.0, 0.0, 0.0]]))
    # k <= 1 over the step: threshold -inf, nothing selected, and every metric finite (the trainer skips a step
    # with a non-finite metric: the study's global runs died after 3 such steps in a row)
    loss, metrics = lpreg_policy_loss(lp, old, proxy, adv, mask, rho=0.0, **AUTHORS_CLIP, selection="global",
                                      lowprob_threshold=-math.inf, proxy_kl=kl)
    assert metrics["lpreg/num_selected"] == 0 and "lpreg/threshold" not in metrics
    assert all(math.isfinite(v) for v in metrics.values()) and loss.item() == pytest.approx((1 + 1 + 1 + 1 - 1) / 5)
    with pytest.raises(ValueError, match="lowprob_threshold"):
        lpreg_policy_loss(lp, old, proxy, adv, mask, rho=0.5, **AUTHORS_CLIP, selection="global")
    with pytest.raises(ValueError, match="global"):
        lpreg_policy_loss(lp, old, proxy, adv, mask, rho=0.5, **AUTHORS_CLIP, proxy_kl=kl)


def _rank_threshold(rank: int, world_size: int, parts: list[list[list[float]]], rho: float) -> float:
    return global_lowprob_threshold([torch.tensor(p) for p in parts[rank]], rho)


def test_global_threshold_over_data_parallel_ranks():
    gen = torch.Generator().manual_seed(5)
    values = (-torch.rand(230, generator=gen) * 10).tolist()
    parts = [[values[:70], values[70:100]], [values[100:230]], []]  # rank 2 has no candidates
    for rho in (0.05, 0.5):
        results = run_ranks(_rank_threshold, 3, parts, rho, timeout_s=60)
        k = int(230 * rho)
        want = sorted(values)[k - 1]
        assert results == [pytest.approx(want)] * 3
    assert run_ranks(_rank_threshold, 3, parts, 0.005, timeout_s=60) == [-math.inf] * 3  # k = 1
    assert global_lowprob_threshold([torch.tensor(values)], 0.1) == pytest.approx(sorted(values)[22])


def test_lowprob_candidates():
    lp, _, adv, _ = _batch()
    mask = _row(1.0, 0.0, 1.0, 1.0, 1.0)
    assert lowprob_candidates(lp, adv, mask).tolist() == [-3.0, -0.5, -2.0]


def test_compute_proxy_logprobs_hand_case_and_reference():
    logits = torch.tensor([[[0.0, math.log(0.5), math.log(0.01)]]])
    got = compute_proxy_logprobs(logits, torch.tensor([[0]]))
    assert got.item() == pytest.approx(-math.log(1.5), rel=1e-6)
    filtered = compute_proxy_logprobs(logits, torch.tensor([[2]]))
    assert filtered.item() == pytest.approx(-1e4 - math.log(1.5), rel=1e-7)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 50, generator=gen) * 4
    tokens = torch.randint(0, 50, (2, 5), generator=gen)
    ref = reference_logprob_stats(logits, tokens, kappa=0.05, temperature=0.8)
    torch.testing.assert_close(
        compute_proxy_logprobs(logits, tokens, kappa=0.05, temperature=0.8).double(), ref.proxy_logprobs,
        rtol=1e-6, atol=1e-5,
    )
