"""GPU-check sections for the fused op: parity with the float64 reference, and speed.

Legend: N tokens, V real vocabulary, Vp = V + padding columns (megatron pads the output layer), e bytes per logit.

``op_parity`` runs :func:`~megatron_lpreg.ops.vocab_parallel.vocab_parallel_logprob_stats` at TP=1 on the chosen
device (on CUDA at the Qwen2.5 vocabulary, large enough that the op works in several row blocks) with fp32 and
bf16 input, and compares values and the logits gradient with
:func:`~megatron_lpreg.ops.reference.reference_logprob_stats` (float64, same device), using the tolerances of
tests/ops/test_vocab_parallel.py.

``op_speed`` times forward + backward of ``sum(logprobs) + sum(entropy)`` for the fused op and for megatron's
``vocab_parallel_cross_entropy`` plus a separate differentiable entropy pass (what a trainer without the fused op
runs), and sets both against the memory-bandwidth bound: the fused op must at least read the logits in the forward,
read them again in the backward and write the gradient, ``3 * N * Vp * e`` bytes, at the device bandwidth measured
with a large copy. Needs megatron's parallel state (initialized here at TP=1 through ``init_parallel``).
"""
from __future__ import annotations

import logging
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lpreg.ops.reference import reference_logprob_stats
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats

logger = logging.getLogger(__name__)

# Tolerances of tests/ops/test_vocab_parallel.py (fp32 accumulation; values up to O(1e4) through the -1e4 fill).
VALUE_ATOL = 1e-5
VALUE_RTOL = 2e-6
GRAD_RTOL = 2e-6
GRAD_RTOL_BF16 = 1e-2
"""bf16 gradients are rounded to 8 mantissa bits."""
AGREEMENT_ATOL = 1e-4
"""op_speed: fused vs megatron log-probs/entropy in fp32 (two fp32 algorithms, different summation order)."""
QWEN25_VOCAB = 152064
PAD_COLUMNS = 64
KAPPA = 0.02


class CheckFailed(RuntimeError):
    """A check of a section did not hold; ``numbers`` keeps what was measured."""

    def __init__(self, message: str, numbers: dict[str, Any]) -> None:
        super().__init__(message)
        self.numbers = numbers


@dataclass(frozen=True)
class ParityCase:
    name: str
    dtype: torch.dtype
    temperature: float = 1.0
    chunks: int = 1
    """The tokens are split into this many chunks (chunk_size = ceil(N / chunks))."""


PARITY_CASES = (ParityCase("fp32", torch.float32), ParityCase("fp32_t0.7_chunked", torch.float32, 0.7, chunks=3),
                ParityCase("bf16", torch.bfloat16))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int,
            pad: int = PAD_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V + pad]`` logits (padding columns hold large garbage that must be ignored) and ``[N]`` targets, half
    of them the row's argmax (kept by the proxy filter) and half uniform (mostly filtered)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n_tokens, vocab + pad, generator=gen, device=device) * 3
    logits[:, vocab:] = 60.0
    tokens = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
    tokens[::2] = logits[::2, :vocab].argmax(-1)
    return logits.to(dtype), tokens


def _max_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max of abs error minus the allowed rtol*|want| + atol; <= 0 means within tolerance)."""
    err = (got.double() - want.double()).abs()
    excess = err - (VALUE_RTOL * want.double().abs() + VALUE_ATOL)
    return err.max().item(), excess.max().item()


def parity_case(case: ParityCase, n_tokens: int, vocab: int, device: torch.device) -> dict[str, float]:
    """One dtype/temperature/chunking case: max errors per output; raises CheckFailed beyond the tolerances."""
    logits, tokens = _inputs(n_tokens, vocab, case.dtype, device, seed=zlib.crc32(case.name.encode()))
    before = logits.clone()
    leaf = logits.clone().requires_grad_()
    chunk = -(-n_tokens // case.chunks)
    stats = vocab_parallel_logprob_stats(leaf, tokens, kappa=KAPPA, temperature=case.temperature, chunk_size=chunk,
                                         with_proxy_kl=True, vocab_size=vocab)
    gen = torch.Generator(device=device).manual_seed(7)
    weights = torch.randn(3, n_tokens, generator=gen, device=device)
    (weights[0] * stats.logprobs + weights[1] * stats.entropy + weights[2] * stats.proxy_kl).sum().backward()

    ref_leaf = logits.double().requires_grad_()
    ref = reference_logprob_stats(ref_leaf, tokens, kappa=KAPPA, temperature=case.temperature, vocab_size=vocab)
    w64 = weights.double()
    (w64[0] * ref.logprobs + w64[1] * ref.entropy + w64[2] * ref.kl_proxy_to_policy).sum().backward()

    numbers: dict[str, float] = {}
    failures = []
    for key, got, want in (("logprobs", stats.logprobs, ref.logprobs), ("entropy", stats.entropy, ref.entropy),
                           ("proxy_logprobs", stats.proxy_logprobs, ref.proxy_logprobs),
                           ("proxy_kl", stats.proxy_kl, ref.kl_proxy_to_policy)):
        numbers[f"{key}_max_abs_err"], excess = _max_errors(got, want.detach())
        if excess > 0:
            failures.append(f"{key} off by {numbers[f'{key}_max_abs_err']:.3g}")
    grad, want_grad = leaf.grad.double(), ref_leaf.grad
    scale = want_grad[:, :vocab].abs().max().item()
    numbers["grad_max_abs_err"] = (grad[:, :vocab] - want_grad[:, :vocab]).abs().max().item()
    numbers["grad_scale"] = scale
    rtol = GRAD_RTOL_BF16 if case.dtype == torch.bfloat16 else GRAD_RTOL
    if numbers["grad_max_abs_err"] > rtol * scale + 1e-7:
        failures.append(f"gradient off by {numbers['grad_max_abs_err']:.3g} (scale {scale:.3g}, rtol {rtol:g})")
    if torch.any(grad[:, vocab:] != 0):
        failures.append("padding columns got a gradient")
    if not torch.equal(logits, before):
        failures.append("the op modified its input")
    if failures:
        raise CheckFailed(f"{case.name}: " + "; ".join(failures), numbers)
    return numbers


def op_parity(device: torch.device) -> dict[str, Any]:
    """Section ``op_parity``: every :data:`PARITY_CASES` case; raises CheckFailed with all numbers on a miss."""
    n_tokens, vocab = (1024, QWEN25_VOCAB) if device.type == "cuda" else (96, 32768)
    numbers: dict[str, Any] = {"tokens": n_tokens, "vocab": vocab, "pad_columns": PAD_COLUMNS, "kappa": KAPPA}
    for case in PARITY_CASES:
        try:
            numbers[case.name] = parity_case(case, n_tokens, vocab, device)
        except CheckFailed as exc:
            numbers[case.name] = exc.numbers
            raise CheckFailed(str(exc), numbers) from None
    return numbers


def measure_bandwidth(device: torch.device, n_bytes: int, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s: the best of ``repeats`` copies of ``n_bytes`` (read + write counted)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def _entropy_pass(logits: torch.Tensor) -> torch.Tensor:
    """A plain differentiable entropy over the full vocabulary (TP=1, so no collective), in fp32."""
    z = logits.float()
    shifted = z - z.detach().amax(-1, keepdim=True)
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    return sum_exp.log() - (exp * shifted).sum(-1) / sum_exp


def _time(fn: Callable[[], Any], leaf: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak device memory above the inputs in MiB, the gradient included; 0 on CPU) of ``fn``
    after one warm-up call; ``leaf.grad`` is dropped before each call."""
    leaf.grad = None
    fn()
    times = []
    peak = 0.0
    for _ in range(repeats):
        leaf.grad = None
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return statistics.median(times), peak


def _speed_one(dtype: torch.dtype, n_tokens: int, vocab: int, device: torch.device, bandwidth: float,
               repeats: int) -> dict[str, float]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, tokens = _inputs(n_tokens, vocab, dtype, device, seed=11, pad=0)
    leaf = logits.requires_grad_()

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        stats = vocab_parallel_logprob_stats(leaf, tokens, kappa=KAPPA, vocab_size=vocab)
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
        return stats.logprobs.detach(), stats.entropy.detach()

    def megatron() -> tuple[torch.Tensor, torch.Tensor]:
        # megatron's op shifts its input in place, so it gets a copy (counted: a trainer needs the logits again).
        nll = vocab_parallel_cross_entropy(leaf.clone(), tokens)
        entropy = _entropy_pass(leaf)
        (-nll.sum() + entropy.sum()).backward()
        return -nll.detach().float(), entropy.detach()

    (fused_logp, fused_ent), (mega_logp, mega_ent) = fused(), megatron()
    fused_s, fused_mib = _time(fused, leaf, device, repeats)
    mega_s, mega_mib = _time(megatron, leaf, device, repeats)
    bound_s = 3 * logits.numel() * logits.element_size() / bandwidth
    return {"fused_s": fused_s, "megatron_ce_plus_entropy_s": mega_s, "speedup_vs_megatron": mega_s / fused_s,
            "bandwidth_bound_s": bound_s, "fused_over_bound": fused_s / bound_s,
            "megatron_over_bound": mega_s / bound_s,
            "fused_peak_mib": fused_mib, "megatron_peak_mib": mega_mib,
            "logprob_max_diff": (fused_logp - mega_logp).abs().max().item(),
            "entropy_max_diff": (fused_ent - mega_ent).abs().max().item()}


def op_speed(device: torch.device) -> dict[str, Any]:
    """Section ``op_speed``: fused op vs megatron CE + entropy vs the bandwidth bound, fp32 (and bf16 on CUDA).

    Checks that both approaches agree in fp32 (a speed number of a wrong result is worthless); the speed ratios are
    reported, not judged.
    """
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig(tp=1, pp=1))
    if ctx.device.type != device.type:
        raise CheckFailed(f"init_parallel chose {ctx.device}, the check asked for {device}", {})
    cuda = device.type == "cuda"
    n_tokens, vocab = (4096, QWEN25_VOCAB) if cuda else (256, 32768)
    copy_bytes = 2 * 2**30 if cuda else 64 * 2**20
    bandwidth = measure_bandwidth(device, copy_bytes)
    numbers: dict[str, Any] = {"tokens": n_tokens, "vocab": vocab, "copy_bandwidth_gb_s": bandwidth / 1e9,
                               "bound_bytes_per_logit": "3 x element size (fwd read, bwd read, grad write)"}
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if cuda else 1]:
            numbers[name] = _speed_one(dtype, n_tokens, vocab, device, bandwidth, repeats=10 if cuda else 3)
            logger.info("op_speed %s: %s", name, numbers[name])
    finally:
        destroy_parallel()
    fp32 = numbers["fp32"]
    if max(fp32["logprob_max_diff"], fp32["entropy_max_diff"]) > AGREEMENT_ATOL:
        raise CheckFailed(f"fused op and megatron disagree in fp32 (log-probs {fp32['logprob_max_diff']:.3g}, "
                          f"entropy {fp32['entropy_max_diff']:.3g} > {AGREEMENT_ATOL:g})", numbers)
    return numbers
