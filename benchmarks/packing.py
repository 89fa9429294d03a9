#!/usr/bin/env python
"""Packed token-balanced micro-batches vs padded micro-batches: time of one policy update (forward + backward
over all micro-batches and the optimizer step) on a long-tailed mix of response lengths, like real RL responses
(most short, a few near the budget). Also checks the two paths give the same log-probs.

padded: sequences padded to the batch's longest, ``micro_batch_tokens // longest`` consecutive sequences per
        micro-batch (trainer.packing=false);
packed: sequences concatenated without padding into micro-batches of at most ``micro_batch_tokens``, balanced
        partitioning (trainer.packing=true), block-diagonal causal mask, per-sequence positions.
Real megatron ranks over gloo on the tiny demo model (configs/tiny_cpu.yaml). Last line:
``packing: padded/packed = <x>x, max_abs_logprob_diff=<d>``.

    python benchmarks/packing.py [--tp 1] [--sequences 64] [--budget 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_lpreg.trainer.cli import _prepare_fork_helper, resolve_config


def long_tailed_lengths(n: int, seed: int, short: tuple[int, int], long: int, long_frac: float) -> list[int]:
    """Response lengths: most uniform in ``short``, a ``long_frac`` share near ``long`` (truncated responses)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if float(torch.rand(1, generator=g)) < long_frac:
            out.append(int(long * (0.8 + 0.2 * float(torch.rand(1, generator=g)))))
        else:
            out.append(int(torch.randint(short[0], short[1] + 1, (1,), generator=g)))
    return out


def regularized_tokens(batch, lp: torch.Tensor, proxy: torch.Tensor, groups: list[list[int]], rho: float
                       ) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """Lp-Reg selection=reference per micro-batch ``groups`` (rows): (selected, regularised) as (row, position):
    among valid A<0 tokens of the group the ``k = max(1, int(n * rho))`` lowest-probability ones (only if k > 1),
    and of those the ones with lp < proxy."""
    out: set[tuple[int, int]] = set()
    selected: set[tuple[int, int]] = set()
    for group in groups:
        rows = torch.tensor(group)
        cand = (batch.loss_mask[rows] > 0) & (batch.advantages[rows] < 0)
        k = max(1, int(int(cand.sum()) * rho))
        if k <= 1:
            continue
        pool = torch.where(cand, lp[rows], torch.full_like(lp[rows], float("inf"))).reshape(-1)
        chosen = torch.topk(pool, k, largest=False).indices
        width = lp.shape[1]
        for flat in chosen.tolist():
            r, t = group[flat // width], flat % width
            selected.add((r, t))
            if lp[r, t] < proxy[r, t]:
                out.add((r, t))
    return selected, out


def _bench(rank: int, world: int, cfg, sequences: int, repeats: int) -> dict:
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.parallel.bootstrap import init_parallel
    from megatron_lpreg.trainer.batch import build_train_batch
    from megatron_lpreg.trainer.policy import Policy

    ctx = init_parallel(cfg.parallel, seed=cfg.seed)
    policy = Policy(cfg.model, cfg.parallel, cfg.optimizer, cfg.algo, ctx, temperature=1.0,
                    micro_batch_tokens=cfg.trainer.micro_batch_tokens, total_steps=100)
    load_hf_weights(policy.raw_chunks, cfg.model.hf_path, cfg.model, ctx)
    g = torch.Generator().manual_seed(1)
    vocab = cfg.model.vocab_size
    longest = cfg.model.max_position_embeddings - 32
    lengths = long_tailed_lengths(sequences, 0, (8, longest // 6), longest, long_frac=0.08)
    prompts = [torch.randint(0, vocab, (int(torch.randint(12, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(sequences)]
    responses = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]
    batch = build_train_batch(prompts, responses, [[-1.0] * k for k in lengths],
                              torch.randn(sequences, generator=g).tolist(), pad_id=0)
    logprobs, times = {}, {False: [], True: []}
    for packing in (False, True):  # same weights for both: before any update
        policy.packing = packing
        with_old = policy.compute_old_logprobs(batch)
        logprobs[packing] = with_old.old_logprobs * batch.loss_mask
    for packing in (False, True):
        policy.packing = packing
        for i in range(repeats + 1):  # first round is warm-up
            t0 = time.perf_counter()
            policy.train_step(batch)
            if i:
                times[packing].append(time.perf_counter() - t0)
    from megatron_lpreg.trainer.batch import balanced_partitions, micro_batch_size_for, sequence_lengths

    mbs = micro_batch_size_for(batch.seq_len, cfg.trainer.micro_batch_tokens)
    padded_groups = [list(range(i, min(i + mbs, sequences))) for i in range(0, sequences, mbs)]
    packed_groups = balanced_partitions(sequence_lengths(batch), cfg.trainer.micro_batch_tokens)
    sel = {name: regularized_tokens(batch, with_old.old_logprobs, with_old.proxy_logprobs, groups, cfg.algo.rho)
           for name, groups in (("padded", padded_groups), ("packed", packed_groups))}
    real = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return {"padded": statistics.median(times[False]), "packed": statistics.median(times[True]),
            "diff": float((logprobs[True] - logprobs[False]).abs().max()), "real_tokens": real,
            "padded_tokens": batch.num_sequences * batch.seq_len, "longest": batch.seq_len,
            "groups": (len(padded_groups), len(packed_groups)),
            "selected": {k: len(v[0]) for k, v in sel.items()}, "regularized": {k: len(v[1]) for k, v in sel.items()},
            "shared": len(sel["padded"][0] & sel["packed"][0]), "candidates": int(((batch.loss_mask > 0)
                                                                             & (batch.advantages < 0)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1024, help="trainer.micro_batch_tokens")
    parser.add_argument("--max-position", type=int, default=512, help="model.max_position_embeddings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    args = parser.parse_args()
    _prepare_fork_helper()
    from megatron_lpreg.parallel.spawn import run_ranks

    cfg = resolve_config(args.config, [f"parallel.tp={args.tp}", f"trainer.world_size={args.tp}",
                                       f"trainer.micro_batch_tokens={args.budget}",
                                       f"model.max_position_embeddings={args.max_position}"])
    r = run_ranks(_bench, args.tp, cfg, args.sequences, args.repeats, timeout_s=3600)[0]
    print(f"policy update, {args.sequences} sequences, {r['real_tokens']} real tokens, longest {r['longest']} "
          f"(padded layout {r['padded_tokens']} tokens), budget {args.budget} tokens/micro-batch, TP{args.tp} gloo, "
          f"median of {args.repeats}:")
    print(f"  padded micro-batches: {r['padded']:.3f} s")
    print(f"  packed micro-batches: {r['packed']:.3f} s")
    print(f"selection=reference (rho={cfg.algo.rho}) on this batch ({r['candidates']} negative-advantage tokens): "
          f"padded {r['groups'][0]} micro-batches select {r['selected']['padded']} tokens (regularise "
          f"{r['regularized']['padded']}), packed {r['groups'][1]} micro-batches select {r['selected']['packed']} "
          f"(regularise {r['regularized']['packed']}), {r['shared']} selected in both")
    print(f"packing: padded/packed = {r['padded'] / r['packed']:.2f}x, max_abs_logprob_diff={r['diff']:.2e}")


if __name__ == "__main__":
    main()
