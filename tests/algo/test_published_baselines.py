"""The baselines as published (verl core_algos / the Lp-Reg authors' fork), float64 against hand-derived values:
KL-Cov's one-token floor, the +-20 log-ratio clamp before every exp, GSPO's sequence-level aggregation, Dr.GRPO's
seq_mean_token_sum_norm. (80/20's normalisation: tests/algo/test_entropy.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.aggregation import LOG_RATIO_CLAMP, aggregate_loss, importance_ratio
from megatron_lpreg.algo.cov import kl_cov_loss
from megatron_lpreg.algo.gspo import gspo_policy_loss
from megatron_lpreg.algo.lpreg import lpreg_policy_loss
from megatron_lpreg.algo.ppo import ppo_policy_loss

F64 = torch.float64


def test_kl_cov_penalises_at_least_one_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -3.0, -3.5]], dtype=F64)
    adv = torch.tensor([[1.0, 0.0, 0.0, -2.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=F64)
    # ratio 2e-3 of 4 tokens: int(0.008) = 0, verl/authors floor it to 1. Covariance (A - mean A)(lp - mean lp)
    # = (1.25, .25, .25, -1.75) * (1.5, .5, -.5, -1.5) = (1.875, .125, -.125, 2.625): token 3 is penalised.
    loss, metrics = kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.002, kl_cov_coef=1.0)
    e = math.exp(-0.5)
    assert loss.item() == pytest.approx((-1.0 + 2.0 * e + 0.5) / 4, abs=1e-15)
    assert metrics["actor/kl_cov_frac"] == 0.25
    loss.backward()
    # d/dlp of -A r + |lp - old| at token 3: 2 e^{-0.5} - 1 (lp < old); token 0: -A = -1; all over 4 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, 0.0, 0.0, 2.0 * e - 1.0]], dtype=F64) / 4,
                               rtol=0, atol=1e-15)
    # no valid token or ratio 0: nothing penalised
    _, none = kl_cov_loss(lp, old, adv, torch.zeros_like(mask), kl_cov_ratio=0.002, kl_cov_coef=1.0)
    _, zero = kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.0, kl_cov_coef=1.0)
    assert none["actor/kl_cov_frac"] == 0.0 and zero["actor/kl_cov_frac"] == 0.0


def test_log_ratio_is_clamped_to_20_before_exp():
    assert LOG_RATIO_CLAMP == 20.0
    x = torch.tensor([-100.0, -20.0, 0.0, 25.0], dtype=F64)
    torch.testing.assert_close(importance_ratio(x), torch.exp(torch.tensor([-20.0, -20.0, 0.0, 20.0], dtype=F64)))
    # a valid token with log-ratio 25 and A = -1: -A r = exp(20) > the clipped branch; beyond the clamp no gradient
    lp = torch.tensor([[25.0, 0.0]], dtype=F64, requires_grad=True)
    loss, _ = ppo_policy_loss(lp, torch.zeros(1, 2, dtype=F64), torch.tensor([[-1.0, 1.0]], dtype=F64),
                              torch.ones(1, 2, dtype=F64), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx((math.exp(20.0) - 1.0) / 2, rel=1e-15)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.5]], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("which", ["ppo", "kl_cov", "lpreg", "gspo"])
def test_huge_log_ratio_on_a_padded_token_gives_no_nan_in_float32(which):
    # fp32 exp overflows above ~88.7; unclamped, inf * 0 on the masked token would put NaN into the gradient
    lp = torch.tensor([[-1.0, 95.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -5.0]])
    adv = torch.tensor([[-1.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0]])
    if which == "ppo":
        loss, _ = ppo_policy_loss(lp, old, adv, mask, clip_low=1.0, clip_high=9.0)
    elif which == "kl_cov":
        loss, _ = kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.5, kl_cov_coef=1.0)
    elif which == "lpreg":
        loss, _ = lpreg_policy_loss(lp, old, torch.tensor([[-0.5, -0.5]]), adv, mask, rho=1.0, clip_low=1.0,
                                    clip_high=9.0)
    else:
        loss, _ = gspo_policy_loss(lp, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0


def test_gspo_is_sequence_level_only():
    # on-policy (s = 1): token loss -A; row 0 has 1 token (A = 1), row 1 has 3 (A = -2)
    lp = torch.tensor([[-0.3, 0.0, 0.0], [-0.1, -0.2, -0.3]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0], [-2.0]], dtype=F64).expand(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    loss, _ = gspo_policy_loss(lp, lp.detach(), adv, mask, clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2, abs=1e-15)  # token mean would be (-1 + 6) / 4
    loss.backward()
    # d/dlp of sg[s] exp(lp - sg[lp]) = 1 per token; row means: row 0 token -1/2, row 1 tokens 2/(3*2)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 0, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64),
                               rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="GSPO is sequence-level"):
        gspo_policy_loss(lp, lp.detach(), adv, mask, clip_low=3e-4, clip_high=4e-4, loss_agg="token_mean")


def test_seq_mean_token_sum_norm_for_drgrpo():
    lp = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0], [-0.5], [3.0]], dtype=F64).expand(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=F64)
    # on-policy r = 1: token loss -A; sums -3 and +1 over the 2 rows with tokens (the empty row does not count)
    loss, _ = ppo_policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.2,
                              loss_agg="seq_mean_token_sum_norm", loss_norm_len=8)
    assert loss.item() == pytest.approx((-3.0 + 1.0) / (2 * 8), abs=1e-15)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv * mask / 16, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="norm_len > 0"):
        aggregate_loss(lp, mask, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("sweep", ["paper_baselines", "paper_baselines_offpolicy"])
def test_paper_baseline_sweeps_load_on_both_paper_configs(sweep, tmp_path):
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.launch.cli_sweep import build_sweep, validate_tasks

    for config in ("configs/qwen3-14b_lpreg_64gpu.yaml", "configs/qwen2.5-32b_lpreg_64gpu.yaml"):
        cfg = RunConfig.load(config, [])
        # the model and data paths the config names, as a user's submit directory holds them
        for path in (cfg.model.hf_path, cfg.model.mcore_path, cfg.eval.data_dir):
            (tmp_path / path).mkdir(parents=True, exist_ok=True)
        (tmp_path / cfg.data.source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / cfg.data.source).touch()
        spec = build_sweep(config, [], [], f"configs/sweeps/{sweep}.yaml")
        tasks = validate_tasks(config, spec, cwd=tmp_path)
        assert any("algo.name=gspo" in task for task in tasks)
        assert ("trainer.updates_per_step=8" in spec.overrides) == sweep.endswith("offpolicy")
