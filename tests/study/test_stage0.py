"""Stage 0 (docs/study.md): the gradient facts of issue 20 with the project's own losses, and the simulation."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.algo.cov import kl_cov_loss
from megatron_lpreg.algo.lpreg import compute_proxy_logprobs, lpreg_policy_loss
from megatron_lpreg.algo.ppo import ppo_policy_loss
from megatron_lpreg.metrics.diagnostics import kl_cancel_fraction, lpreg_selection
from megatron_lpreg.study.stage0 import SPARK, Stage0Grid, Stage0Setup, effect_rows, initial_logits, simulate

VOCAB, SPARK_P = 512, 0.05


def _spark_gradient(filtered_mass: float, *, lpreg: bool) -> tuple[float, torch.Tensor]:
    """d loss / d logp(spark) x n_tokens, on-policy, for a batch [spark, main] with A = -1 (both selected)."""
    logits = initial_logits(VOCAB, SPARK_P, filtered_mass).reshape(1, 1, -1).expand(1, 2, -1)
    tokens = torch.tensor([[SPARK, 0]])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clone().requires_grad_(True)
    adv, mask = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    proxy = compute_proxy_logprobs(logits, tokens, kappa=0.02)
    if lpreg:
        loss, metrics = lpreg_policy_loss(lp, lp.detach(), proxy, adv, mask, rho=1.0, clip_low=1.0, clip_high=9.0)
        assert metrics["lpreg/num_regularized"] == 2.0
    else:
        loss, _ = ppo_policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    return float(lp.grad[0, 0]) * 2, proxy


@pytest.mark.parametrize("mass,table", [(0.001, 0.999), (0.05, 0.947), (0.2, 0.750)])
def test_gradient_on_the_spark_is_one_minus_filtered_over_kept_mass(mass, table):
    grad, proxy = _spark_gradient(mass, lpreg=True)
    tail_each = mass / (VOCAB - 2)
    assert tail_each < 0.02 * (1 - SPARK_P - mass)  # every tail token is below the cut, the spark above it
    expected = 1.0 - mass / (1.0 - mass)  # |A| - filtered / kept: the k3 gradient 1 - exp(proxy - lp) = 1 - 1/K
    assert grad == pytest.approx(expected, abs=1e-9)
    assert round(grad, 3) == table  # the table
    # the diagnostic reports the same share: filtered / kept
    lp = torch.log(torch.tensor([[SPARK_P]], dtype=torch.float64))
    reg = torch.tensor([[True]])
    share = kl_cancel_fraction(lp, lp, proxy[:, :1], -torch.ones(1, 1, dtype=torch.float64), reg)
    assert share == pytest.approx(mass / (1 - mass), rel=1e-9)


def test_plain_grpo_pushes_the_spark_down_with_exactly_abs_advantage():
    grad, _ = _spark_gradient(0.0, lpreg=False)
    assert grad == 1.0
    grad_lpreg, _ = _spark_gradient(0.0, lpreg=True)  # nothing filtered (1e-12): Lp-Reg changes nothing
    assert grad_lpreg == pytest.approx(1.0, abs=1e-9)


def test_clip_higher_and_kl_cov_equal_grpo_on_policy_exactly():
    gen = torch.Generator().manual_seed(0)
    lp0 = torch.log(torch.rand(4, 16, generator=gen, dtype=torch.float64))
    adv = torch.randn(4, 1, generator=gen, dtype=torch.float64).expand(4, 16).clone()
    mask = torch.ones(4, 16, dtype=torch.float64)
    grads = []
    for loss_fn in (lambda lp: ppo_policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.2),
                    lambda lp: ppo_policy_loss(lp, lp.detach(), adv, mask, clip_low=0.2, clip_high=0.28),
                    lambda lp: kl_cov_loss(lp, lp.detach(), adv, mask, kl_cov_ratio=0.2, kl_cov_coef=1.0)):
        lp = lp0.clone().requires_grad_(True)
        loss_fn(lp)[0].backward()
        grads.append(lp.grad)
    assert float((grads[1] - grads[0]).abs().max()) == 0.0
    assert float((grads[2] - grads[0]).abs().max()) == 0.0
    # off-policy (old != current) they differ: the test can fail
    lp = lp0.clone().requires_grad_(True)
    kl_cov_loss(lp, lp0.detach() + 0.3, adv, mask, kl_cov_ratio=0.2, kl_cov_coef=1.0)[0].backward()
    assert not torch.equal(lp.grad, grads[0])


def test_simulation_is_deterministic_and_on_policy_baselines_coincide():
    runs = {arm: simulate(Stage0Setup(arm=arm, steps=4, seed=3)) for arm in ("grpo", "clip_higher", "kl_cov")}
    assert runs["grpo"].curve == runs["clip_higher"].curve == runs["kl_cov"].curve
    assert simulate(Stage0Setup(arm="grpo", steps=4, seed=3)).curve == runs["grpo"].curve
    off = [simulate(Stage0Setup(arm=arm, steps=4, seed=3, off_policy=True)).curve for arm in ("grpo", "kl_cov")]
    assert off[0] != off[1]


def test_lpreg_with_k_at_most_one_is_grpo_and_large_rho_regularizes_the_spark():
    grpo = simulate(Stage0Setup(arm="grpo", steps=3, seed=1, tail_mass=0.05))
    tiny = simulate(Stage0Setup(arm="lpreg", steps=3, seed=1, tail_mass=0.05, rho=0.001))
    assert tiny.curve == grpo.curve and tiny.regularized_per_step == 0.0
    big = simulate(Stage0Setup(arm="lpreg", steps=3, seed=1, tail_mass=0.05, rho=1.0))
    assert big.regularized_per_step > 0 and big.spark_selected_frac > 0


def test_selection_diagnostic_matches_the_loss_count():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 40, 32, generator=gen, dtype=torch.float64) * 3
    tokens = torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen).reshape(1, 40)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    proxy = compute_proxy_logprobs(logits, tokens)
    adv = torch.randn(1, 40, generator=gen, dtype=torch.float64)
    mask = torch.ones_like(lp)
    _, metrics = lpreg_policy_loss(lp, lp, proxy, adv, mask, rho=0.3, clip_low=0.2, clip_high=0.28)
    assert int(lpreg_selection(lp, proxy, adv, mask, rho=0.3).sum()) == metrics["lpreg/num_regularized"] > 0


def test_grid_pairs_every_lpreg_arm_with_grpo_and_effect_rows_pair_by_seed():
    setups = Stage0Grid(seeds=2, steps=2).setups()
    assert len(setups) == len(set(setups))
    keys = {(s.tail_mass, s.off_policy, s.seed) for s in setups if s.arm == "grpo"}
    assert all((s.tail_mass, s.off_policy, s.seed) in keys for s in setups)
    results = [simulate(Stage0Setup(arm=a, steps=2, seed=s, rho=0.5)) for a in ("grpo", "lpreg") for s in (0, 1)]
    (row,) = effect_rows(results)
    logs = [math.log(results[2 + s].spark_survival / results[s].spark_survival) for s in (0, 1)]
    assert row["survival_ratio"] == pytest.approx(math.exp(sum(logs) / 2)) and row["seeds"] == 2


def test_cli_writes_runs_effects_and_plot(tmp_path, capsys):
    from megatron_lpreg.cli import main

    assert main(["study", "stage0", "--out", str(tmp_path), "--seeds", "1", "--steps", "1"]) == 0
    assert "stage0: 25 runs, 20 seed-paired effects" in capsys.readouterr().out
    assert all((tmp_path / name).stat().st_size > 100 for name in ("stage0_runs.csv", "stage0_effects.csv",
                                                                    "stage0.png"))
