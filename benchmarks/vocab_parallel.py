"""Benchmark: the fused vocab-parallel Lp-Reg op vs gathering the vocabulary, and vs megatron's cross entropy.

Each rank holds a ``[N, V/tp]`` fp32 logits shard (V = 152,064, the Qwen2.5 vocabulary) and runs forward + backward
of ``sum(logprobs) + sum(entropy)`` (the proxy log-probs are computed too where the approach can) with:

* ``fused``: :func:`megatron_lpreg.ops.vocab_parallel.vocab_parallel_logprob_stats` (one chunk, and chunked);
* ``gather``: all-gather the full logits, then plain torch log_softmax / entropy / min-p proxy;
* ``megatron``: ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (log-probs only) plus a separate
  differentiable vocab-parallel entropy pass (no proxy). Megatron's op subtracts the max in place from its input, so
  it gets a clone of the shard when another pass needs the logits; that clone is counted.

Time is the median of ``--repeats`` runs after one warm-up (wall clock, and the rank process's CPU time, which is
less sensitive to other load on a shared machine; slowest rank reported); peak memory is the per-rank resident
high-water mark above the resident size just before the measured run (VmHWM after resetting it through
/proc/self/clear_refs), so it covers every temporary including autograd's saved tensors. Each approach runs in
freshly forked ranks (gloo).
CPU only: the GPU variant of this comparison is not implemented here.

Usage: ``python benchmarks/vocab_parallel.py [--tokens 1024] [--tp 2] [--repeats 3]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from megatron_lpreg.ops.vocab_parallel import PROXY_FILL_LOGIT, vocab_parallel_logprob_stats
from megatron_lpreg.parallel.spawn import run_ranks

QWEN25_VOCAB = 152064
KAPPA = 0.02


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _fused(shard: torch.Tensor, tokens: torch.Tensor, vocab: int, chunk: int | None) -> None:
    stats = vocab_parallel_logprob_stats(shard, tokens, kappa=KAPPA, chunk_size=chunk, vocab_size=vocab)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()


def _gather(shard: torch.Tensor, tokens: torch.Tensor, vocab: int, chunk: int | None) -> None:
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, shard.detach())
    pieces[dist.get_rank()] = shard  # the gradient of this rank's slice flows back through it
    full = torch.cat(pieces, dim=-1)
    log_p = torch.log_softmax(full, dim=-1)
    logprobs = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    with torch.no_grad():
        probs = torch.softmax(full, dim=-1)
        kept = probs >= KAPPA * probs.amax(-1, keepdim=True)
        proxy = torch.log_softmax(torch.where(kept, full, PROXY_FILL_LOGIT), dim=-1).gather(-1, tokens.unsqueeze(-1))
    del proxy
    (logprobs.sum() + entropy.sum()).backward()


def _vocab_parallel_entropy(shard: torch.Tensor) -> torch.Tensor:
    """A plain differentiable vocab-parallel entropy: three collectives forward, autograd saves the exp."""
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    row_max = shard.detach().amax(-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = shard - row_max
    exp = shifted.exp()
    sum_exp = differentiable_all_reduce(exp.sum(-1))
    sum_exp_shifted = differentiable_all_reduce((exp * shifted).sum(-1))
    return sum_exp.log() - sum_exp_shifted / sum_exp


def _megatron(shard: torch.Tensor, tokens: torch.Tensor, vocab: int, chunk: int | None) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    nll = vocab_parallel_cross_entropy(shard.clone(), tokens)
    entropy = _vocab_parallel_entropy(shard)
    (-nll.sum() + entropy.sum()).backward()


APPROACHES = {
    "fused": (_fused, None),
    "fused_chunk256": (_fused, 256),
    "gather": (_gather, None),
    "megatron": (_megatron, None),
}


def _rank_bench(rank: int, world_size: int, name: str, tokens: int, repeats: int) -> dict[str, float]:
    fn, chunk = APPROACHES[name]
    if name == "megatron":
        from megatron.core import parallel_state

        from megatron_lpreg.parallel.cpu import enter_cpu_mode, install_cpu_shim

        install_cpu_shim()
        enter_cpu_mode()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    gen = torch.Generator().manual_seed(1234)
    shard_vocab = QWEN25_VOCAB // world_size
    full = torch.randn(tokens, QWEN25_VOCAB, generator=gen) * 2
    shard = full[:, rank * shard_vocab : (rank + 1) * shard_vocab].clone().requires_grad_()
    target = torch.randint(0, QWEN25_VOCAB, (tokens,), generator=gen)
    del full
    fn(shard, target, QWEN25_VOCAB, chunk)  # warm-up
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        shard.grad = None
        dist.barrier()
        before = _rss_kib("VmRSS")
        _reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(shard, target, QWEN25_VOCAB, chunk)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append(_rss_kib("VmHWM") - before)
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "peak_mib": max(peaks) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (the issue suggests 4096)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(APPROACHES), choices=list(APPROACHES))
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))
    print(f"V={QWEN25_VOCAB} N={args.tokens} tp={args.tp} fp32 gloo, threads/rank={torch.get_num_threads()}, "
          f"cpu_count={os.cpu_count()}, torch {torch.__version__}")
    results = {}
    for name in args.only:
        per_rank = run_ranks(_rank_bench, args.tp, name, args.tokens, args.repeats, timeout_s=1800)
        results[name] = {key: max(r[key] for r in per_rank) for key in ("time_s", "cpu_s", "peak_mib")}
        res = results[name]
        print(f"{name:16s} fwd+bwd wall {res['time_s']:8.3f} s  cpu {res['cpu_s']:8.3f} s  "
              f"peak/rank {res['peak_mib']:9.1f} MiB", flush=True)
    for base in ("gather", "megatron"):
        if base not in results:
            continue
        for name in ("fused", "fused_chunk256"):
            if name in results:
                t = results[base]["time_s"] / results[name]["time_s"]
                c = results[base]["cpu_s"] / results[name]["cpu_s"]
                m = results[name]["peak_mib"] / results[base]["peak_mib"]
                print(f"{name} vs {base}: {t:.2f}x faster (wall), {c:.2f}x less cpu time, "
                      f"peak memory {m:.3f} of {base}'s")


if __name__ == "__main__":
    main()
