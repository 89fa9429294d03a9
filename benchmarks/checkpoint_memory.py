"""Peak host memory of saving and loading a distributed-optimizer checkpoint, per ``checkpoint.optimizer_format``.

Two forked gloo ranks (DP2, TP1, the distributed optimizer, fp32 Adam) build a random Qwen2-shaped model of
``--hidden``/``--layers``/``--vocab``, take one optimizer step (so Adam's moments exist), then save a checkpoint and
load it into a freshly built model and optimizer. A thread in each rank samples its resident set every
``--interval`` seconds; printed per format and rank:

* ``save_growth``/``load_growth``: the peak RSS during the save/load minus the RSS just before it (what the call
  itself needed on top of the model, gradients and optimizer state it already held);
* the same relative to one full fp32 copy of the model's parameters (``model_fp32``), so the numbers scale to
  other sizes: ``fully_reshardable`` gathers param + exp_avg + exp_avg_sq of the whole TP/PP shard on every DP rank
  (3 x model_fp32 expected), ``dp_reshardable`` writes each rank's own 1/DP shard as is.

The load is checked against what was saved (Adam moments bit for bit), so the numbers come from working modes:

    python benchmarks/checkpoint_memory.py                  # ~110M parameters, ~3 min on 2 cores
    python benchmarks/checkpoint_memory.py --hidden 256 --layers 2 --vocab 8000   # quick
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.models.checkpoint import OPTIMIZER_FORMATS, load_checkpoint, save_checkpoint
from megatron_lpreg.parallel.spawn import run_ranks

GIB = 2**30


class PeakRss:
    """Samples this process' RSS in a thread while active; ``growth`` = peak minus the RSS at entry (bytes)."""

    def __init__(self, interval: float) -> None:
        self.interval, self.growth = interval, 0
        self._stop = threading.Event()

    def _sample(self, start: int) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.growth = max(self.growth, process.memory_info().rss - start)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        start = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(start,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _trained(model_cfg: ModelConfig):
    """Model chunk, DDP wrapper and distributed optimizer of this rank, after one step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_lpreg.models.qwen import build_model_chunks
    from megatron_lpreg.parallel import cpu
    from megatron_lpreg.parallel.bootstrap import init_parallel

    parallel_cfg = ParallelConfig(use_distributed_optimizer=True)
    ctx = init_parallel(parallel_cfg, seed=0)
    raw = build_model_chunks(model_cfg, parallel_cfg)
    raw[0].config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=raw[0].config, module=raw[0], ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, params_dtype=torch.float32,
                                                 use_distributed_optimizer=True), [ddp])
    tokens = torch.randint(0, model_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(ctx.rank))
    with cpu.cpu_mode():
        ddp(tokens, torch.arange(16)[None], None).float().pow(2).mean().backward()
        ddp.finish_grad_sync()
        opt.step()
    return ctx, raw, opt


def _adam_moments(opt) -> list[torch.Tensor]:
    return [t.clone() for o in opt.chained_optimizers for st in o.optimizer.state.values()
            for t in (st["exp_avg"], st["exp_avg_sq"])]


def _rank(rank: int, world: int, model_cfg: ModelConfig, fmt: str, root: str, interval: float) -> dict:
    from megatron_lpreg.parallel.bootstrap import destroy_parallel

    ctx, raw, opt = _trained(model_cfg)
    saved = _adam_moments(opt)
    model_bytes = sum(p.numel() * 4 for p in raw[0].parameters())
    with PeakRss(interval) as save:
        save_checkpoint(Path(root) / fmt, raw, model_cfg, ctx, optimizer=opt, optimizer_format=fmt)
    destroy_parallel(destroy_process_group=False)
    del raw, opt
    ctx, raw, opt = _trained(model_cfg)
    with PeakRss(interval) as load:
        load_checkpoint(Path(root) / fmt, raw, model_cfg, ctx, optimizer=opt)
    exact = all(map(torch.equal, saved, _adam_moments(opt)))
    destroy_parallel(destroy_process_group=False)
    return {"save_growth": save.growth, "load_growth": load.growth, "model_fp32": model_bytes, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--interval", type=float, default=0.005, help="RSS sampling period, seconds")
    args = parser.parse_args()
    model_cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                            num_layers=args.layers, num_attention_heads=args.hidden // 128 or 1,
                            num_query_groups=1, head_dim=128 if args.hidden >= 128 else args.hidden)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; DP2 distributed optimizer, fp32")
    with tempfile.TemporaryDirectory(prefix="ckpt_mem_") as root:
        for fmt in OPTIMIZER_FORMATS:
            ranks = run_ranks(_rank, 2, model_cfg, fmt, root, args.interval, timeout_s=1800, threads_per_rank=1)
            for r, res in enumerate(ranks):
                m = res["model_fp32"]
                print(f"{fmt:18s} rank {r}: save +{res['save_growth'] / GIB:.2f} GiB ({res['save_growth'] / m:.2f}x "
                      f"model_fp32), load +{res['load_growth'] / GIB:.2f} GiB ({res['load_growth'] / m:.2f}x), "
                      f"model_fp32 {m / GIB:.2f} GiB, Adam state loaded exactly: {res['exact']}")


if __name__ == "__main__":
    main()
