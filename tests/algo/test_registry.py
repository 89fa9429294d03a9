"""The trainer's entry point: every configured name dispatches, needs its inputs, and namespaces its metrics."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from megatron_lpreg.algo.inputs import PolicyLossInputs
from megatron_lpreg.algo.lpreg import lpreg_policy_loss
from megatron_lpreg.algo.registry import (
    POLICY_LOSSES,
    LossRequirements,
    compute_policy_loss,
    loss_requirements,
)
from megatron_lpreg.config.algo import AlgoConfig, AlgoName
from megatron_lpreg.config.base import ConfigError

METRIC_NAMESPACES = ("loss/", "actor/", "lpreg/", "entropy/")


def _inputs(**overrides) -> PolicyLossInputs:
    gen = torch.Generator().manual_seed(0)
    shape = (4, 50)
    logprobs = (-torch.rand(shape, generator=gen) * 5).requires_grad_()
    fields = dict(
        logprobs=logprobs,
        old_logprobs=logprobs.detach() + 0.1 * torch.randn(shape, generator=gen),
        advantages=torch.tensor([[1.0], [-1.0], [-0.5], [0.5]]).expand(shape),
        response_mask=(torch.rand(shape, generator=gen) < 0.9).float(),
        proxy_logprobs=logprobs.detach() + torch.randn(shape, generator=gen),
        entropy=torch.rand(shape, generator=gen).requires_grad_(),
        proxy_kl=torch.rand(shape, generator=gen).requires_grad_(),
        lowprob_threshold=-3.0,
        global_valid_tokens=500.0,
        generator=torch.Generator().manual_seed(1),
    )
    fields.update(overrides)
    return PolicyLossInputs(**fields)


@pytest.mark.parametrize("name", typing.get_args(AlgoName))
@pytest.mark.parametrize("loss_agg", ["token_mean", "global_token_mean", "seq_mean_token_sum_norm"])
def test_every_configured_name_runs(name, loss_agg):
    if name == "gspo":  # sequence-level only: any other aggregation is a config error
        with pytest.raises(ConfigError, match="algo.name=gspo is sequence-level"):
            AlgoConfig(name=name, loss_agg=loss_agg, loss_norm_len=64).validate()
        loss_agg = "seq_mean_token_mean"
    cfg = AlgoConfig(name=name, loss_agg=loss_agg, loss_norm_len=64, entropy_coef=0.01, clip_cov_ratio=0.05,
                     kl_cov_ratio=0.05)
    cfg.validate()
    inputs = _inputs()
    loss, metrics = compute_policy_loss(cfg, inputs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.logprobs.grad).all()
    assert inputs.logprobs.grad.abs().sum() > 0
    assert metrics["loss/policy"] == pytest.approx(loss.item())
    assert all(key.startswith(METRIC_NAMESPACES) for key in metrics), sorted(metrics)


def test_registered_losses_take_the_inputs_object_and_live_in_their_loss_module():
    cfg = AlgoConfig(name="entropy", entropy_coef=0.01)
    x = _inputs()
    assert POLICY_LOSSES["entropy"](x, cfg)[0].item() == compute_policy_loss(cfg, x)[0].item()
    for name, fn in POLICY_LOSSES.items():
        assert fn.__module__.rpartition(".")[2] in ("lpreg", "ppo", "entropy", "cov", "gspo"), name


def test_requirements_name_only_what_costs_work():
    assert [f.name for f in dataclasses.fields(LossRequirements)] == [
        "proxy_logprobs", "proxy_kl_direction", "global_threshold"]
    assert loss_requirements(AlgoConfig(name="grpo", loss_agg="global_token_mean")) == LossRequirements(
        proxy_logprobs=False, proxy_kl_direction=None, global_threshold=False)


def test_lpreg_dispatch_equals_direct_call_and_global_exact_kl():
    cfg = AlgoConfig(name="lpreg", rho=0.1, clip_low=1.0, clip_high=9.0)
    x = _inputs()
    loss, _ = compute_policy_loss(cfg, x)
    direct, _ = lpreg_policy_loss(x.logprobs, x.old_logprobs, x.proxy_logprobs, x.advantages, x.response_mask,
                                  rho=0.1, clip_low=1.0, clip_high=9.0)
    assert loss.item() == direct.item()
    cfg = AlgoConfig(name="lpreg", selection="global", proxy_kl="exact_proxy_to_policy")
    need = loss_requirements(cfg)
    assert need.proxy_kl_direction == "proxy_to_policy" and need.global_threshold and need.proxy_logprobs
    loss, metrics = compute_policy_loss(cfg, x)
    loss.backward()
    assert metrics["lpreg/num_regularized"] > 0 and x.proxy_kl.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "cfg, missing",
    [
        (AlgoConfig(name="lpreg"), "proxy_logprobs"),
        (AlgoConfig(name="lpreg", selection="global"), "lowprob_threshold"),
        (AlgoConfig(name="lpreg", selection="global", proxy_kl="exact_policy_to_proxy"), "proxy_kl"),
        (AlgoConfig(name="entropy"), "entropy"),
        (AlgoConfig(name="forking_80_20"), "entropy"),
    ],
)
def test_missing_inputs_are_named(cfg, missing):
    x = _inputs(proxy_logprobs=None, entropy=None, lowprob_threshold=None, proxy_kl=None)
    if missing != "proxy_logprobs":
        x.proxy_logprobs = _inputs().proxy_logprobs
    if missing == "proxy_kl":
        x.lowprob_threshold = -3.0
    with pytest.raises(ValueError, match=missing):
        compute_policy_loss(cfg, x)


def test_unknown_name_is_a_config_error():
    cfg = dataclasses.replace(AlgoConfig(), name="ppo2")
    with pytest.raises(ConfigError, match="algo.name"):
        compute_policy_loss(cfg, _inputs())
