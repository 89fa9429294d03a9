"""Peak memory of HF <-> megatron conversion against the size of the largest tensor.

Makes a synthetic wide Qwen2 checkpoint on the fly (bf16, Qwen-size vocabulary, written one layer at a time),
converts it HF -> megatron at each requested TP x PP layout and back to HF, checks the round trip bit for bit
(tensor by tensor, lazily), and samples every process of the job (this one and the forked ranks) every
``--interval`` seconds:

* ``peak_rank_rss``: the largest resident set of any single process (file-backed pages of mmap'd safetensors
  included, as the kernel counts them);
* ``growth``: that peak minus the RSS the process started with (forked ranks start with this process' imports);
* ``peak_job_pss``: the peak of the job's summed proportional set size (shared pages split between processes).

Ratios are reported against the largest tensor and against the whole model:

    python benchmarks/convert_memory.py                       # ~1.8 GB model, layouts 1x1 and 2x2
    python benchmarks/convert_memory.py --layers 2 --vocab 32000 --layouts 1x1   # quick
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lpreg.config.model import ModelConfig
from megatron_lpreg.models.convert import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_lpreg.models.families import hf_config_json
from megatron_lpreg.models.hf_dir import HFSafetensors

GIB = 2**30


def write_synthetic(out: Path, cfg: ModelConfig, seed: int) -> tuple[int, int]:
    """Random HF Qwen2 weights, one safetensors file per layer; returns (total bytes, largest tensor bytes)."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d

    def rand(*shape: int) -> torch.Tensor:  # row blocks: never a full fp32 copy of a big tensor
        t = torch.empty(shape, dtype=torch.bfloat16)
        flat = t.view(shape[0], -1)
        for start in range(0, shape[0], 4096):
            block = flat[start:start + 4096]
            block.copy_(torch.randn(block.shape, generator=gen) * 0.02)
        return t

    files: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(cfg.vocab_size, h)},
        {"lm_head.weight": rand(cfg.vocab_size, h), "model.norm.weight": rand(h)},
    ]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        files.append({
            p + "input_layernorm.weight": rand(h), p + "post_attention_layernorm.weight": rand(h),
            p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.q_proj.bias": rand(q),
            p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.k_proj.bias": rand(kv),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.v_proj.bias": rand(kv),
            p + "self_attn.o_proj.weight": rand(h, q), p + "mlp.gate_proj.weight": rand(f, h),
            p + "mlp.up_proj.weight": rand(f, h), p + "mlp.down_proj.weight": rand(h, f),
        })
    total = largest = 0
    weight_map = {}
    for n, _ in enumerate(list(files)):
        tensors = files[n]
        name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            size = t.numel() * t.element_size()
            total, largest = total + size, max(largest, size)
            weight_map[key] = name
        files[n] = {}  # drop this file's tensors before making the next
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config_json(cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total, largest


@dataclass
class Sampler:
    """Samples this process and its descendants until stopped."""

    interval: float
    peak_rss: int = 0
    peak_growth: int = 0
    peak_pss: int = 0
    _start_rss: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        me = psutil.Process()
        parent_rss = me.memory_info().rss
        pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                pss += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            start = self._start_rss.setdefault(proc.pid, parent_rss if proc.pid != me.pid else rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_growth = max(self.peak_growth, rss - start)
        self.peak_pss = max(self.peak_pss, pss)

    def __enter__(self) -> Sampler:
        def loop() -> None:
            while not self._stop.is_set():
                self._sample()
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def same_tensors(a: Path, b: Path) -> bool:
    """Bit-exact comparison, one tensor at a time."""
    def index(d: Path) -> dict[str, Path]:
        return {k: d / f for k, f in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].items()}

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layouts", default="1x1,2x2", help="comma-separated TPxPP layouts to convert at")
    parser.add_argument("--max-shard-mb", type=int, default=256, help="HF export file size (writer buffer)")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--workdir", default=None, help="default: a temp dir, removed afterwards")
    args = parser.parse_args()
    cfg = ModelConfig(arch="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                      head_dim=args.hidden // args.heads, params_dtype="bfloat16")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-mem-"))
    try:
        start = time.monotonic()
        if (work / "hf" / "config.json").is_file():  # reuse a --workdir from an earlier run
            hf = HFSafetensors(work / "hf")
            sizes = [torch.Size(hf.shape(n)).numel() * 2 for n in hf.names()]
            total, largest = sum(sizes), max(sizes)
        else:
            total, largest = write_synthetic(work / "hf", cfg, seed=0)
        baseline = psutil.Process().memory_info().rss
        print(f"synthetic qwen2 ({args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
              f"bf16): {total / GIB:.2f} GiB, largest tensor {largest / GIB:.3f} GiB, made in "
              f"{time.monotonic() - start:.0f} s; this process' RSS after imports {baseline / GIB:.2f} GiB")
        print(f"{'step':<24}{'s':>6}{'peak_rank_rss':>15}{'growth':>9}{'peak_job_pss':>14}"
              f"{'growth/largest':>16}{'growth/model':>14}")
        for layout in args.layouts.split(","):  # the export streams from the checkpoint: its layout does not matter
            tp, pp = (int(x) for x in layout.split("x"))
            mcore, back = work / f"mcore-{layout}", work / f"back-{layout}"
            for step, run in [
                (f"hf->mcore tp{tp} pp{pp}",
                 lambda mcore=mcore, tp=tp, pp=pp: convert_hf_to_mcore(work / "hf", mcore, tp=tp, pp=pp)),
                (f"mcore->hf (from {layout})", lambda mcore=mcore, back=back: convert_mcore_to_hf(
                    mcore, back, max_shard_bytes=args.max_shard_mb * 2**20)),
            ]:
                t0 = time.monotonic()
                with Sampler(args.interval) as s:
                    run()
                print(f"{step:<24}{time.monotonic() - t0:>6.0f}{s.peak_rss / GIB:>13.2f}Gi{s.peak_growth / GIB:>7.2f}Gi"
                      f"{s.peak_pss / GIB:>12.2f}Gi{s.peak_growth / largest:>16.2f}{s.peak_growth / total:>14.2f}",
                      flush=True)
            ok = same_tensors(work / "hf", back)
            print(f"round trip tp{tp} pp{pp}: {'bit-exact' if ok else 'MISMATCH'}")
            if not ok:
                return 1
            shutil.rmtree(mcore)
            shutil.rmtree(back)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
