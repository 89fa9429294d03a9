"""The fused op on the real vocab-parallel output of a megatron-core GPTModel at TP2 (gloo, CPU shim).

Each rank runs the tiny Qwen2-shaped GPTModel (vocabulary 1000, padded by megatron to 1024, so the second shard ends
in 24 padding columns), feeds its ``[B, S, Vp/2]`` logits shard to the op with the TP group from
``init_parallel``, and backpropagates through the model. The parent compares values and the logits gradient with
the float64 reference on the gathered logits, and checks that gradients reach the embedding. Not covered: pipeline
parallelism (the trainer's schedules call the op on the last stage only) and sequence parallelism.
"""
from __future__ import annotations

import megatron.core.models.gpt  # noqa: F401  (imported in the parent so forked ranks start fast)
import torch
import torch.distributed as dist

from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.models.qwen import build_gpt_model, resolve_model_config
from megatron_lpreg.ops.reference import reference_logprob_stats
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_lpreg.parallel.bootstrap import init_parallel
from megatron_lpreg.parallel.spawn import run_ranks

VOCAB = 1000
VALUE_ATOL = 2e-5  # fp32 op vs float64 reference on O(1) logits of a random model
GRAD_ATOL = 1e-6


def _rank(rank: int, world_size: int) -> dict:
    parallel = ParallelConfig(tp=world_size)
    ctx = init_parallel(parallel, seed=0)
    model_cfg = resolve_model_config(ModelConfig(vocab_size=VOCAB))
    model = build_gpt_model(model_cfg, parallel)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, 0] = VOCAB - 1  # a target in the last real column, next to the padding
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    logits_shard = model(inputs, positions, None)
    logits_shard.retain_grad()
    stats = vocab_parallel_logprob_stats(
        logits_shard, targets, group=ctx.tp_group, kappa=0.5, temperature=0.9, vocab_size=VOCAB, with_proxy_kl=True
    )
    weights = torch.randn(3, *targets.shape, generator=gen)
    loss = (weights[0] * stats.logprobs + weights[1] * stats.entropy + weights[2] * stats.proxy_kl).sum()
    loss.backward()
    pieces = [torch.empty_like(logits_shard) for _ in range(ctx.tp_size)]
    dist.all_gather(pieces, logits_shard.detach().contiguous(), group=ctx.tp_group)
    grads = [torch.empty_like(logits_shard) for _ in range(ctx.tp_size)]
    dist.all_gather(grads, logits_shard.grad.contiguous(), group=ctx.tp_group)
    embedding = model.embedding.word_embeddings.weight.grad
    return {
        "shard_vocab": logits_shard.shape[-1], "logits": torch.cat(pieces, -1), "grad": torch.cat(grads, -1),
        "targets": targets, "weights": weights,
        "stats": (stats.logprobs.detach(), stats.entropy.detach(), stats.proxy_logprobs, stats.proxy_kl.detach()),
        "embedding_grad_norm": float(embedding.norm()) if embedding is not None else 0.0,
    }


def test_op_on_gptmodel_output_layer_at_tp2():
    results = run_ranks(_rank, 2, timeout_s=180, threads_per_rank=1)
    first = results[0]
    padded = first["logits"].shape[-1]
    assert first["shard_vocab"] * 2 == padded and padded > VOCAB  # megatron's padded vocab, split in two
    for key in ("stats", "logits", "grad"):
        for a, b in zip(*(r[key] if isinstance(r[key], tuple) else (r[key],) for r in results)):
            assert torch.equal(a, b), key
    logits = first["logits"].to(torch.float64).requires_grad_()
    ref = reference_logprob_stats(logits, first["targets"], kappa=0.5, temperature=0.9, vocab_size=VOCAB)
    expected = (ref.logprobs, ref.entropy, ref.proxy_logprobs, ref.kl_proxy_to_policy)
    for got, want in zip(first["stats"], expected):
        torch.testing.assert_close(got.to(torch.float64), want.detach(), atol=VALUE_ATOL, rtol=1e-6)
    weights = first["weights"].to(torch.float64)
    (weights[0] * ref.logprobs + weights[1] * ref.entropy + weights[2] * ref.kl_proxy_to_policy).sum().backward()
    torch.testing.assert_close(first["grad"].to(torch.float64), logits.grad, atol=GRAD_ATOL, rtol=1e-5)
    assert torch.all(first["grad"][..., VOCAB:] == 0)
    assert all(r["embedding_grad_norm"] > 0 for r in results)
