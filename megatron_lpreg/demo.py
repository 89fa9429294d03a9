"""``megatron-lpreg demo``: the CPU demo behind ``make demo``.

1. make the tiny Qwen2 of configs/tiny_cpu.yaml offline, convert it to a Megatron dist checkpoint at TP2 x PP2
   and check logits parity against transformers (prints the ``parity:`` line);
2. warm-start it with a short supervised phase on the synthetic addition task (a random model never gets a reward,
   so RL from it would learn nothing; a real base model already solves some problems) — in Hugging Face
   transformers on one process and thread, in float64 so that it ends at the same step with the same weights on
   every x86-64 CPU (see :data:`WARM_START_DTYPE`), stopping as soon as greedy accuracy on a dev split reaches a
   threshold;
3. Lp-Reg RL from the warm-started weights through the Ray launcher, two ranks as two data-parallel replicas
   (gloo; see :data:`RL_LAYOUT`), in-process rollout engine;
   held-out accuracy is evaluated before the first and after the last step;
4. print ``demo: heldout_accuracy before=<a> after=<b>`` and write a metrics plot.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_lpreg import telemetry
from megatron_lpreg.config import RunConfig
from megatron_lpreg.telemetry import read_jsonl

logger = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

WARM_START_DTYPE = torch.float64
"""The warm start computes in float64 on one thread, so every x86-64 CPU takes (nearly) the same path through it.

In float32 the result depended on the CPU: BLAS and ATen kernels are chosen per instruction set (AVX2, AVX-512,
MKL's vendor-specific paths) and per thread count, each choice rounds sums in another order (weights differed by up
to 6e-5 after six steps between AVX-512 with two threads and scalar kernels on one), training amplifies that, and
greedy dev accuracy is so jumpy near the stop threshold (0.105 -> 0.270 within ten steps) that the warm start
stopped at a different step and quality on each CPU (held-out greedy 0.225 on an AMD EPYC, 0.330 on an Intel Xeon).
In float64, with the float32 islands of transformers' Qwen2 removed (:func:`_compute_in_float64`), the
differences start near 1e-16 and stay far below what can flip a greedy token. The weights are saved in float32."""
RL_LAYOUT = ("parallel.tp=1",)
"""The RL phase runs its two ranks as two data-parallel replicas (TP1 x DP2), not at configs/tiny_cpu.yaml's TP2.

At TP2 both ranks generate all 512 responses of a step in lockstep, with two gloo all-reduces per layer of every
decoding forward, and split each matrix product of a 0.9M-parameter model in two; at DP2 each rank generates and
trains on its own 256 responses with the whole model and the ranks meet once per step (the gradient all-reduce).
The arithmetic per rank is the same, the overhead is not: CPU time per RL step fell from about 1.75 s to 1.05 s
per rank (docs/benchmarks.md), which brings ``make demo`` under 10 minutes on two cores. ``megatron-lpreg demo
parallel.tp=2`` runs the TP2 layout (the parity check before the warm start converts and checks TP2 x PP2 either
way)."""
WARM_START_THREADS = 1
"""One thread: no split reductions, and no OpenMP spin-waiting on a busy 2-core machine (two threads made the
warm start 10x slower there). The tiny model gains nothing from a second thread."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(REPO_CONFIGS / "tiny_cpu.yaml"), help="demo config")
    parser.add_argument("--out", default="demo_out", help="output directory (runs, plot)")
    parser.add_argument("--baseline", action="store_true", help="also run the GRPO baseline (doubles the time)")
    parser.add_argument("--sft-target", type=float, default=0.30, help="stop warm start at this dev accuracy")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for the RL run")


def _compute_in_float64(model: torch.nn.Module) -> None:
    """Make a float64 transformers Qwen2 compute everything in float64.

    transformers computes RMSNorm and the rotary tables in float32 whatever the model dtype (``.to(torch.float32)``,
    ``.float()``); those float32 roundings differ between CPU kernels and made two float64 warm starts on different
    instruction sets drift apart (loss 1e-6 apart by step 110, 1e-2 by step 280). This replaces the two forwards
    on this model instance only, with the same formulas in the input's dtype.
    """
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_same_dtype, module)
        elif kind.endswith("RotaryEmbedding"):
            config = module.config
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
            module.inv_freq = 1.0 / (float(config.rope_parameters["rope_theta"]) ** exponent)
            module.forward = types.MethodType(_rotary_same_dtype, module)


def _rms_norm_same_dtype(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_same_dtype(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warm_start(base_dir: Path, out_dir: Path, cfg: RunConfig, *, target_acc: float, max_steps: int = 1500,
               batch_size: int = 64, lr: float = 1e-3) -> tuple[Path, dict]:
    """Supervised warm start on the synthetic task (response tokens only); returns the HF dir and a summary.

    Computes in :data:`WARM_START_DTYPE` on :data:`WARM_START_THREADS` thread(s), so the stopping step and the
    saved weights are the same on every x86-64 CPU; stops at the first check (every 10 steps) whose dev greedy
    accuracy reaches ``target_acc``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_lpreg.data import build_dataset

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.to(WARM_START_DTYPE)
    _compute_in_float64(model)
    dataset = build_dataset(cfg.data, tokenizer, seed=cfg.seed + 1000)
    dev = dataset.dev()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    acc, step = 0.0, 0
    with _torch_threads(WARM_START_THREADS):
        for step in range(1, max_steps + 1):
            batch = dataset.next_batch(batch_size)
            seqs, masks = [], []
            for p in batch:
                target = tokenizer(f"\\boxed{{{p.ground_truth}}}", add_special_tokens=False)["input_ids"] + [eos]
                seqs.append(list(p.token_ids) + target)
                masks.append([0] * len(p.token_ids) + [1] * len(target))
            width = max(map(len, seqs))
            ids = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
            mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=WARM_START_DTYPE)
            loss = supervised_step(model, optim, ids, mask)
            if step % 10 == 0:
                acc = greedy_accuracy(model, tokenizer, dev, eos)
                logger.info("warm start step %d: loss %.3f dev greedy accuracy %.3f", step, loss.item(), acc)
                if acc >= target_acc:
                    break
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, {"steps": step, "dev_greedy_acc": acc, "seconds": time.perf_counter() - t0}


def supervised_step(model: torch.nn.Module, optim: torch.optim.Optimizer, ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """One supervised warm-start step: next-token NLL averaged over the positions ``mask`` marks, gradient norm
    clipped to 1, one optimizer step. Returns the loss tensor.

    Args:
        ids: [B, L] token ids (prompt + target + pad).
        mask: [B, L] 1 on the target tokens to learn, 0 elsewhere (in the model's dtype).
    """
    logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    return loss


@torch.no_grad()
def greedy_accuracy(model, tokenizer, prompts, eos: int, max_new_tokens: int = 14) -> float:
    from megatron_lpreg.reward.boxed import last_boxed

    ids = torch.tensor([list(p.token_ids) for p in prompts])  # synthetic prompts all have the same length
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(last_boxed(t) == p.ground_truth for t, p in zip(texts, prompts)) / len(prompts)


def _conversion_parity(hf_dir: Path, mcore_dir: Path) -> None:
    """Convert HF -> megatron TP2 x PP2 and compare logits with transformers (the foundation's smoke test)."""
    from megatron_lpreg.models.convert import convert_hf_to_mcore
    from megatron_lpreg.models.parity import check_parity

    convert_hf_to_mcore(hf_dir, mcore_dir, tp=2, pp=2, overwrite=True)
    result = check_parity(hf_dir, mcore_dir=mcore_dir, tp=2, pp=2)
    print(f"demo: converted {hf_dir.name} to megatron TP2xPP2 ({'OK' if result.ok else 'FAIL'})")
    print(result.line())
    if not result.ok:
        raise SystemExit(f"parity check failed (tolerance {result.tolerance:g})")


def _replace_previous_demo_run(run_dir: Path) -> None:
    """Each demo run starts from step 0: remove what an earlier demo run left in ``run_dir``. Anything there that is
    not a run directory (no config.yaml) is left alone and refused."""
    if not run_dir.exists():
        return
    if any(run_dir.iterdir()) and not (run_dir / "config.yaml").is_file():
        raise FileExistsError(f"{run_dir} exists and is not a demo run directory; choose another --out")
    logger.info("replacing the previous demo run in %s", run_dir)
    shutil.rmtree(run_dir)


def run(args: argparse.Namespace) -> int:
    from megatron_lpreg.plotting import plot_runs
    from megatron_lpreg.trainer.cli import _prepare_fork_helper, materialize_tiny, resolve_config
    from megatron_lpreg.trainer.launch import launch

    telemetry.setup(0, 1)
    _prepare_fork_helper()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.load(args.config)
    base = materialize_tiny(cfg.model)
    _conversion_parity(base, out / "mcore_tp2pp2")
    warm_dir = out / "warm_start"
    if not (warm_dir / "config.json").exists():
        _, summary = warm_start(base, warm_dir, cfg, target_acc=args.sft_target)
        logger.info("warm start: %s", summary)
    runs = [("lpreg", args.config)]
    if args.baseline:
        runs.append(("grpo", str(Path(args.config).with_name("tiny_cpu_grpo.yaml"))))
    results = {}
    for name, config in runs:
        run_dir = out / name
        overrides = [f"model.hf_path={warm_dir}", f"trainer.output_dir={run_dir}", "trainer.launcher=ray",
                     "trainer.resume=never", *RL_LAYOUT, *args.overrides]
        run_cfg = resolve_config(config, overrides)
        _replace_previous_demo_run(run_dir)
        run_dir.mkdir(parents=True)
        run_cfg.save(run_dir / "config.yaml")
        code = launch(run_cfg, str(run_dir))
        if code != 0:
            print(f"demo: training '{name}' exited with code {code}")
            return code
        rows = read_jsonl(run_dir / "eval.jsonl")
        results[name] = (rows[0], rows[-1])
    plot = plot_runs([out / name for name, _ in runs], out / "demo_metrics.png", smooth=5)
    for name, (before, after) in results.items():
        print(f"demo[{name}]: heldout sampled accuracy before={before['heldout/sampled_acc']:.3f} "
              f"after={after['heldout/sampled_acc']:.3f}")
    print(f"demo: plot {plot}  (total {time.perf_counter() - t0:.0f} s)")
    before, after = results["lpreg"]
    print(f"demo: heldout_accuracy before={before['heldout/greedy_acc']:.3f} after={after['heldout/greedy_acc']:.3f}")
    return 0
