#!/usr/bin/env python
"""On-policy fast path vs the authors' structure: policy-update time per RL step.

fast: old log-probs and the min-p proxy come detached from the loss forward (1 forward + 1 backward per
      micro-batch);
two-pass: a separate no-grad forward computes them first (what the authors' veRL code does, which in fact runs two
      extra forwards: old log-probs and the proxy), then the update.
Runs real megatron ranks over gloo on the tiny demo model (or a wider one with --hidden) and prints the ratio.

    python benchmarks/onpolicy_step.py [--tp 2] [--sequences 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_lpreg.trainer.cli import _prepare_fork_helper, resolve_config


def _bench(rank: int, world: int, cfg, sequences: int, response_len: int, repeats: int) -> dict:
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.parallel.bootstrap import init_parallel
    from megatron_lpreg.trainer.batch import build_train_batch
    from megatron_lpreg.trainer.policy import Policy

    ctx = init_parallel(cfg.parallel, seed=cfg.seed)
    policy = Policy(cfg.model, cfg.parallel, cfg.optimizer, cfg.algo, ctx, temperature=1.0,
                    micro_batch_tokens=cfg.trainer.micro_batch_tokens, total_steps=100)
    load_hf_weights(policy.raw_chunks, cfg.model.hf_path, cfg.model, ctx)
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.vocab_size
    prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(sequences)]
    responses = [torch.randint(0, vocab, (response_len,), generator=g).tolist() for _ in range(sequences)]
    batch = build_train_batch(prompts, responses, [[-1.0] * response_len] * sequences,
                              torch.randn(sequences, generator=g).tolist(), pad_id=0)
    times = {"fast": [], "two_pass": []}
    for i in range(repeats + 1):  # first round is warm-up
        t0 = time.perf_counter()
        policy.accumulate_gradients(batch)
        t1 = time.perf_counter()
        policy.accumulate_gradients(policy.compute_old_logprobs(batch))
        t2 = time.perf_counter()
        if i:
            times["fast"].append(t1 - t0)
            times["two_pass"].append(t2 - t1)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    args = parser.parse_args()
    _prepare_fork_helper()
    from megatron_lpreg.parallel.spawn import run_ranks

    cfg = resolve_config(args.config, [f"parallel.tp={args.tp}", f"trainer.world_size={args.tp}"])
    result = run_ranks(_bench, args.tp, cfg, args.sequences, args.response_len, args.repeats, timeout_s=3600)[0]
    print(f"policy update, {args.sequences} sequences x {16 + args.response_len} tokens, TP{args.tp} gloo, "
          f"median of {args.repeats}:")
    print(f"  fast path (1 fwd + 1 bwd):       {result['fast']:.3f} s")
    print(f"  separate old-log-prob pass:      {result['two_pass']:.3f} s")
    print(f"onpolicy_step: two_pass/fast = {result['two_pass'] / result['fast']:.2f}x")


if __name__ == "__main__":
    main()
