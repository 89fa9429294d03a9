"""The trainer's policy update on real megatron ranks (gloo): the on-policy fast path gives the same gradients
as a separate old-log-prob pass, TP/PP layouts give the same update, and a non-finite loss skips the step."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_lpreg.config import RunConfig
from megatron_lpreg.models.qwen import model_config_from_hf
from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.trainer.batch import TrainBatch, build_train_batch
from tests.support.tiny import tiny_model_dir

# Gradients from two code paths that do the same float32 math in a different call order: they agree to
# rounding (the reductions are identical, so in practice bit-for-bit); 1e-6 relative leaves room for BLAS order.
GRAD_RTOL = 1e-6
# Across TP/PP layouts the matmuls are split differently, so fp32 sums round differently.
LAYOUT_RTOL = 2e-5
# After one Adam step at lr 1e-3: Adam divides by sqrt(v), so a parameter whose true gradient is ~0 (the
# key bias: softmax is invariant to it) moves by +-lr * (rounding noise / |noise|). Agreement within 5% of lr
# still catches any sharding mistake (those move weights by O(lr) or corrupt them outright).
WEIGHT_ATOL = 5e-5


def _cfg(hf_dir, algo="lpreg", tp=1, pp=1, world=1, **algo_kw) -> RunConfig:
    model = model_config_from_hf(hf_dir)
    model = type(model)(**{**model.__dict__, "hf_path": str(hf_dir)})
    cfg = RunConfig.from_dict({"parallel": {"tp": tp, "pp": pp}, "trainer": {"world_size": world},
                               "algo": {"name": algo, "rho": 0.2, **algo_kw}, "optimizer": {"lr": 1e-3}})
    return cfg.replace(model=model)


def _batch(seed=0, n=12, vocab=300) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(0, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    adv = torch.randn(n, generator=g).tolist()
    return build_train_batch(prompts, responses, [[-1.0] * len(r) for r in responses], adv, pad_id=0)


def _policy(cfg: RunConfig, micro_batch_tokens=40):
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.parallel.bootstrap import init_parallel
    from megatron_lpreg.trainer.policy import Policy

    ctx = init_parallel(cfg.parallel, seed=cfg.seed)
    policy = Policy(cfg.model, cfg.parallel, cfg.optimizer, cfg.algo, ctx, temperature=1.0,
                    micro_batch_tokens=micro_batch_tokens, total_steps=10)
    load_hf_weights(policy.raw_chunks, cfg.model.hf_path, cfg.model, ctx)
    return policy, ctx


def _grads(policy) -> dict[str, torch.Tensor]:
    return {name: p.main_grad.detach().clone() for chunk in policy.chunks for name, p in chunk.named_parameters()}


def _fast_path_vs_old_pass(rank, world, cfg):
    policy, _ = _policy(cfg)
    batch = _batch()
    fast_metrics = policy.accumulate_gradients(batch)
    fast = _grads(policy)
    with_old = policy.compute_old_logprobs(batch)
    slow_metrics = policy.accumulate_gradients(with_old)
    slow = _grads(policy)
    worst = max(float((fast[k] - slow[k]).abs().max() / slow[k].abs().max().clamp(min=1e-12)) for k in fast)
    return worst, fast_metrics, slow_metrics, float(sum(g.abs().sum() for g in fast.values()))


@pytest.mark.parametrize("algo,tp", [("lpreg", 2), ("grpo", 1), ("entropy", 2)])
def test_on_policy_fast_path_matches_separate_old_logprob_pass(algo, tp):
    cfg = _cfg(tiny_model_dir("qwen2"), algo=algo, tp=tp, world=tp, entropy_coef=0.01)
    worst, fast_m, slow_m, total = run_ranks(_fast_path_vs_old_pass, tp, cfg, timeout_s=240)[0]
    assert total > 0  # gradients really flowed
    assert worst <= GRAD_RTOL, worst
    for key in fast_m:
        assert math.isclose(fast_m[key], slow_m[key], rel_tol=1e-5, abs_tol=1e-7), key
    if algo == "lpreg":
        assert fast_m["lpreg/num_regularized"] == slow_m["lpreg/num_regularized"]


def _one_update(rank, world, cfg):
    policy, ctx = _policy(cfg)
    result = policy.train_step(_batch(seed=3))
    from megatron_lpreg.models.bridge import export_hf_weights

    weights = {k: v for k, v in export_hf_weights(policy.raw_chunks, cfg.model, ctx)}
    return result.grad_norm, result.metrics.get("loss/policy"), weights if ctx.tp_rank == 0 else None


def test_layouts_give_the_same_update():
    hf = tiny_model_dir("qwen2")
    base = run_ranks(_one_update, 1, _cfg(hf), timeout_s=240)[0]
    for tp, pp in [(2, 1), (1, 2)]:
        results = run_ranks(_one_update, tp * pp, _cfg(hf, tp=tp, pp=pp, world=tp * pp), timeout_s=240)
        assert math.isclose(results[0][0], base[0], rel_tol=LAYOUT_RTOL)
        assert math.isclose(results[-1][1], base[1], rel_tol=LAYOUT_RTOL, abs_tol=1e-6)
        merged = {}
        for r in results:
            merged.update(r[2] or {})
        assert merged.keys() == base[2].keys()
        for name, tensor in base[2].items():
            torch.testing.assert_close(merged[name], tensor, rtol=0.0, atol=WEIGHT_ATOL, msg=name)


def _nan_step(rank, world, cfg):
    policy, ctx = _policy(cfg)
    batch = _batch()
    batch.advantages[0, :] = float("nan")
    before = [p.detach().clone() for p in policy.raw_chunks[0].parameters()]
    result = policy.train_step(batch)
    after = list(policy.raw_chunks[0].parameters())
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    good = policy.train_step(_batch(seed=1))
    return result.skipped, unchanged, good.skipped, math.isfinite(good.grad_norm)


def test_non_finite_loss_skips_the_update_on_every_rank():
    cfg = _cfg(tiny_model_dir("qwen2"), tp=2, world=2)
    for skipped, unchanged, good_skipped, good_finite in run_ranks(_nan_step, 2, cfg, timeout_s=240):
        assert skipped and unchanged
        assert not good_skipped and good_finite


def _one_bad_gradient(rank, world, cfg):
    policy, ctx = _policy(cfg)
    accumulate = policy.accumulate_gradients

    def poisoned(batch, **kw):  # the loss stays finite: only one element of one rank's gradient is not
        metrics = accumulate(batch, **kw)
        if ctx.rank == 1:
            last = [p for p in policy.chunks[0].parameters() if getattr(p, "main_grad", None) is not None][-1]
            last.main_grad.view(-1)[0] = float("inf")
        return metrics

    policy.accumulate_gradients = poisoned
    before = [p.detach().clone() for p in policy.raw_chunks[0].parameters()]
    result = policy.train_step(_batch())
    unchanged = all(torch.equal(a, b) for a, b in zip(before, policy.raw_chunks[0].parameters()))
    finite_loss = all(math.isfinite(v) for v in result.metrics.values())
    return result.skipped, unchanged, finite_loss


def test_one_non_finite_gradient_element_on_one_rank_skips_the_update_everywhere():
    # _grads_finite folds every main_grad into one device flag; the step's one all-reduce spreads it to all ranks
    cfg = _cfg(tiny_model_dir("qwen2"), tp=2, world=2)
    for skipped, unchanged, finite_loss in run_ranks(_one_bad_gradient, 2, cfg, timeout_s=240):
        assert skipped and unchanged and finite_loss


def _grad_norm_with(rank, world, cfg):
    policy, _ = _policy(cfg)
    return policy.train_step(_batch(seed=5)).grad_norm


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_gives_the_same_update(recompute):
    hf = tiny_model_dir("qwen2")
    base = _cfg(hf, tp=2, world=2)
    plain = run_ranks(_grad_norm_with, 2, base, timeout_s=240)[0]
    parallel = type(base.parallel)(**{**base.parallel.__dict__, "recompute": recompute})
    again = run_ranks(_grad_norm_with, 2, base.replace(parallel=parallel), timeout_s=240)[0]
    assert math.isclose(plain, again, rel_tol=1e-6), (plain, again)


def test_float16_training_is_refused_before_anything_is_built():
    # megatron's fp16 optimizer divides gradients by its loss scale (2**32 at first); training it needs
    # config.grad_scale_func and overflow-skipped steps, which the trainer does not do: refused, bf16 offered.
    from megatron_lpreg.config.base import ConfigError
    from megatron_lpreg.trainer.policy import Policy

    cfg = _cfg(tiny_model_dir("qwen2"))
    fp16 = type(cfg.model)(**{**cfg.model.__dict__, "params_dtype": "float16"})
    with pytest.raises(ConfigError, match=r"model.params_dtype=float16 .*bfloat16"):
        Policy(fp16, cfg.parallel, cfg.optimizer, cfg.algo, None, temperature=1.0, micro_batch_tokens=40,
               total_steps=1)


def _two_steps_then_export(rank, world, cfg):
    from megatron_lpreg.models.bridge import export_hf_weights

    policy, ctx = _policy(cfg, micro_batch_tokens=20)  # 12 micro-batches: the reduction waits for the last
    norms = [policy.train_step(_batch(seed=s)).grad_norm for s in range(2)]
    return norms, {name: t.clone() for name, t in export_hf_weights(policy.raw_chunks, cfg.model, ctx)}


def test_overlapped_grad_reduce_and_param_gather_give_the_same_weights():
    # gloo runs megatron DDP's asynchronous bucket reductions too. Without the forced gather after the step the
    # exported weights lag one update behind (measured 1e-3 off at lr 1e-3); without no_sync_func megatron would
    # reduce after the first micro-batch's backward.
    base = _cfg(tiny_model_dir("qwen2"), world=2)
    plain = dataclasses.replace(base.parallel, use_distributed_optimizer=True)
    overlapped = dataclasses.replace(plain, overlap_grad_reduce=True, overlap_param_gather=True)
    want = run_ranks(_two_steps_then_export, 2, base.replace(parallel=plain), timeout_s=240)
    got = run_ranks(_two_steps_then_export, 2, base.replace(parallel=overlapped), timeout_s=240)
    for (want_norms, want_weights), (got_norms, got_weights) in zip(want, got):
        assert got_norms == want_norms
        for name, tensor in want_weights.items():
            assert torch.equal(got_weights[name], tensor), name
