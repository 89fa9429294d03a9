"""Fused vocab-parallel log-prob / entropy / Lp-Reg proxy statistics over a tensor-parallel logits shard.

Legend: N tokens (all leading dims of the shard flattened, e.g. S*B or B*T), Vs vocab columns held by this rank,
V the real (unpadded) global vocabulary, tp the size of the tensor-parallel group. Rank r holds the contiguous
columns ``[r*Vs, (r+1)*Vs)``, as megatron's ColumnParallelLinear output layer gives; global columns ``>= V`` are
Megatron vocab padding and take part in nothing.

Per chunk of tokens the forward pass makes exactly two collectives: a MAX all-reduce of the row max of the raw
logits, and one SUM all-reduce of a packed ``[chunk, 5]`` tensor holding every sum the statistics need. The
backward pass recomputes the softmax from the saved per-row scalars and makes no collective. Nothing of the size of
the shard is saved besides the (unmodified) input itself. Inside a chunk, rows are processed in blocks that reuse
two work buffers, so memory does not grow with the chunk.

Temperature: the sampling distribution is ``pi = softmax(z / temperature)``. ``logprobs``, ``entropy`` and the
proxy-KL refer to ``pi``. The proxy follows the Lp-Reg authors exactly: the min-p filter is applied to the
*un-tempered* logits (keep ``z_v >= max z + ln kappa``), filtered logits are replaced by -1e4 (not -inf), then the
result is divided by the temperature and log-softmaxed. With temperature 1 (all the authors' runs) the two
coincide with the plain definitions.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PROXY_FILL_LOGIT = -1.0e4
"""Value the authors write into min-p-filtered logits before the log-softmax (not -inf)."""

ProxyKLDirection = Literal["proxy_to_policy", "policy_to_proxy"]

# Columns of the packed SUM all-reduce.
_SUM_EXP, _SUM_EXP_SHIFTED, _TARGET_LOGIT, _PROXY_SUM_EXP, _KL_AUX = range(5)
_N_PACKED = 5
# Columns of the per-row scalars saved for backward.
_ROW_MAX, _LOG_SUM, _ENTROPY, _PROXY_LOG_SUM, _KL = range(5)
_N_SAVED = 5


@dataclass(frozen=True)
class LogprobStats:
    """Per-token statistics, each shaped like ``tokens`` and identical on every rank of the group.

    Attributes:
        logprobs: ``log pi(y)`` of the target token under ``softmax(z / temperature)``; differentiable.
        entropy: entropy of ``softmax(z / temperature)`` in nats; differentiable.
        proxy_logprobs: Lp-Reg proxy log-prob of the target (detached: the proxy stands for pi_old). About
            ``-1e4 - logsumexp(kept)`` (divided by the temperature) when the target was filtered.
        proxy_kl: exact full-vocabulary KL between proxy and policy in the requested direction (differentiable,
            the proxy held constant), or None when not requested.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    proxy_logprobs: torch.Tensor
    proxy_kl: torch.Tensor | None = None


@dataclass(frozen=True)
class _ShardLayout:
    group: dist.ProcessGroup | None
    tp: int
    vocab_start: int
    n_valid: int  # real (unpadded) columns of this shard: a prefix, since padding sits at the global end
    vocab_size: int  # real global vocabulary V


def _layout(group: dist.ProcessGroup | None, shard_vocab: int, vocab_size: int | None) -> _ShardLayout:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        tp, tp_rank = 1, 0
    else:
        tp, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    padded = shard_vocab * tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, shard columns * tp = {shard_vocab}*{tp} = {padded}]; pass the "
            "tokenizer's vocabulary size (or None when the shards hold no padding)"
        )
    start = tp_rank * shard_vocab
    n_valid = max(0, min(shard_vocab, vocab_size - start))
    return _ShardLayout(group=group, tp=tp, vocab_start=start, n_valid=n_valid, vocab_size=vocab_size)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, layout: _ShardLayout) -> torch.Tensor:
    if layout.tp > 1:
        dist.all_reduce(tensor, op=op, group=layout.group)
    return tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 inputs accumulate in fp32; float64 stays float64 (gradcheck, references).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _proxy_constants(row_max: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(kept_scale, fill_exp)`` of the proxy, relative to the policy's shift by the row max M.

    The proxy logits are ``where(kept, z, FILL)``; their max is ``Mp = max(M, FILL)`` because the row max itself is
    always kept (kappa <= 1), so no second MAX collective is needed. Shifted by Mp and divided by T, a kept entry
    is ``(z - M)/T + (M - Mp)/T`` and a filtered one ``(FILL - Mp)/T``: their exps are ``exp((z - M)/T) *
    kept_scale`` and ``fill_exp``. When every logit is below the fill value the authors' -1e4 makes filtered
    entries *larger* than kept ones; this reproduces that too.
    """
    proxy_max = torch.clamp(row_max, min=PROXY_FILL_LOGIT)
    return torch.exp((row_max - proxy_max) / temperature), torch.exp((PROXY_FILL_LOGIT - proxy_max) / temperature)


def _target_columns(tokens: torch.Tensor, layout: _ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    local = tokens - layout.vocab_start
    in_shard = (local >= 0) & (local < layout.n_valid)
    return local.clamp(0, max(layout.n_valid - 1, 0)), in_shard


_CPU_BLOCK_ELEMENTS = 1 << 20
"""On CPU rows are processed in blocks of about this many elements (4 MiB in fp32): the work buffers are reused
from block to block and stay in cache, instead of fresh ``[chunk, Vs]`` temporaries (page faults dominate on CPU)."""
_GPU_BLOCK_ELEMENTS = 1 << 27
"""On GPU blocks are large (512 MiB per fp32 work buffer) to keep kernel launches few, but still bounded: a 30k-token
micro-batch at Vs = 76k would otherwise need two 9 GB buffers."""


def _block_rows(n_valid: int, chunk: int, device: torch.device) -> int:
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    return max(1, min(chunk, budget // max(n_valid, 1)))


class _VocabParallelLogprobStats(torch.autograd.Function):
    """Autograd Function behind :func:`vocab_parallel_logprob_stats`: 2 collectives per chunk forward, 0 backward."""

    @staticmethod
    def forward(ctx, logits_2d, tokens_1d, layout, log_kappa, temperature, chunk, kl_direction):
        n_tokens = logits_2d.shape[0]
        cdtype = _compute_dtype(logits_2d.dtype)
        saved = torch.zeros(n_tokens, _N_SAVED, dtype=cdtype, device=logits_2d.device)
        outputs = torch.zeros(4, n_tokens, dtype=cdtype, device=logits_2d.device)
        block = _block_rows(layout.n_valid, chunk, logits_2d.device)
        work = torch.empty(2, min(block, n_tokens), layout.n_valid, dtype=cdtype, device=logits_2d.device)
        for begin in range(0, n_tokens, chunk):
            end = min(begin + chunk, n_tokens)
            _forward_chunk(
                logits_2d[begin:end], tokens_1d[begin:end], layout, log_kappa, temperature, kl_direction,
                saved[begin:end], outputs[:, begin:end], work,
            )
        del work
        ctx.save_for_backward(logits_2d, tokens_1d, saved)
        ctx.layout, ctx.log_kappa, ctx.temperature, ctx.block, ctx.kl_direction = (
            layout, log_kappa, temperature, block, kl_direction,
        )
        logprobs, entropy, proxy_logprobs, proxy_kl = outputs.unbind(0)
        ctx.mark_non_differentiable(proxy_logprobs)
        return logprobs, entropy, proxy_logprobs, proxy_kl

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_proxy, grad_kl):
        logits_2d, tokens_1d, saved = ctx.saved_tensors
        layout, block = ctx.layout, ctx.block
        n_tokens = logits_2d.shape[0]
        grad_logits = torch.empty_like(logits_2d)
        grad_logits[:, layout.n_valid :] = 0.0  # padding columns
        if layout.n_valid == 0 or n_tokens == 0:
            return grad_logits, None, None, None, None, None, None
        weights = torch.stack([grad_logprobs, grad_entropy, grad_kl], dim=-1).to(saved.dtype)
        # Write straight into the gradient when it is contiguous fp32/fp64 (no padding on this shard), else stage.
        direct = (grad_logits.dtype == saved.dtype and layout.n_valid == logits_2d.shape[1]
                  and grad_logits.is_contiguous())
        work = torch.empty(1 if direct else 2, min(block, n_tokens), layout.n_valid, dtype=saved.dtype,
                           device=logits_2d.device)
        for begin in range(0, n_tokens, block):
            end = min(begin + block, n_tokens)
            target = grad_logits[begin:end, : layout.n_valid]
            out = target if direct else work[1][: end - begin]
            _backward_block(logits_2d[begin:end], tokens_1d[begin:end], saved[begin:end], weights[begin:end], ctx,
                            out, work[0][: end - begin])
            if not direct:
                target.copy_(out)
        return grad_logits, None, None, None, None, None, None


def _forward_chunk(logits, tokens, layout, log_kappa, temperature, kl_direction, saved, outputs, work) -> None:
    """Statistics of one chunk of rows (two collectives); writes ``saved`` and ``outputs`` (owned buffers).

    ``work`` is two reusable ``[block, n_valid]`` compute-dtype buffers, the only shard-sized memory besides the input
    (the exact proxy-KL path adds block-sized temporaries).
    """
    cdtype = saved.dtype
    rows = logits.shape[0]
    z_chunk = logits[:, : layout.n_valid]
    if layout.n_valid:
        local_max = z_chunk.amax(dim=-1).to(cdtype)
    else:
        local_max = torch.full((rows,), -math.inf, dtype=cdtype, device=logits.device)
    row_max = _all_reduce(local_max, dist.ReduceOp.MAX, layout)
    keep_threshold = _keep_threshold(log_kappa, temperature)
    _, fill_exp = _proxy_constants(row_max, temperature)

    packed = torch.zeros(rows, _N_PACKED, dtype=cdtype, device=logits.device)
    block = work.shape[1]
    for begin in range(0, rows if layout.n_valid else 0, block):
        end = min(begin + block, rows)
        # .to() returns the input itself for fp32 input: z is only read, the caller's tensor is never written.
        _block_sums(z_chunk[begin:end].to(cdtype), tokens[begin:end], row_max[begin:end], fill_exp[begin:end],
                    layout, keep_threshold, temperature, kl_direction, packed[begin:end], work)
    packed = _all_reduce(packed, dist.ReduceOp.SUM, layout)
    _finalize(packed, row_max, keep_threshold, temperature, kl_direction, saved, outputs)


def _block_sums(z, tokens, row_max, fill_exp, layout, keep_threshold, temperature, kl_direction, packed, work) -> None:
    """This shard's packed sums for one block of rows (two passes of exp-free arithmetic per buffer, one exp).

    Masks are float 0/1 in a work buffer: bool reductions and masked fills are several times slower on CPU.
    """
    rows = z.shape[0]
    shifted, exp_shifted = work[0][:rows], work[1][:rows]
    torch.sub(z, row_max.unsqueeze(-1), out=shifted)
    if temperature != 1.0:
        shifted.div_(temperature)
    torch.exp(shifted, out=exp_shifted)
    packed[:, _SUM_EXP] = exp_shifted.sum(-1)
    local_col, in_shard = _target_columns(tokens, layout)
    packed[:, _TARGET_LOGIT] = torch.where(in_shard, z.gather(1, local_col.unsqueeze(1)).squeeze(1), 0.0)
    if kl_direction is not None:
        packed[:, _KL_AUX] = _kl_aux(shifted, exp_shifted, keep_threshold, row_max, fill_exp, temperature,
                                     kl_direction)
    packed[:, _SUM_EXP_SHIFTED] = shifted.mul_(exp_shifted).sum(-1)
    kept = torch.ge(exp_shifted, keep_threshold, out=shifted)  # reuses the buffer: 1.0 where kept
    n_filtered = layout.n_valid - kept.sum(-1)
    kept_scale, _ = _proxy_constants(row_max, temperature)
    packed[:, _PROXY_SUM_EXP] = kept_scale * exp_shifted.mul_(kept).sum(-1) + n_filtered * fill_exp


def _finalize(packed, row_max, keep_threshold, temperature, kl_direction, saved, outputs) -> None:
    """Per-token statistics from the all-reduced sums (identical on every rank)."""
    log_sum = torch.log(packed[:, _SUM_EXP])
    entropy = log_sum - packed[:, _SUM_EXP_SHIFTED] / packed[:, _SUM_EXP]
    target_diff = packed[:, _TARGET_LOGIT] - row_max
    proxy_log_sum = torch.log(packed[:, _PROXY_SUM_EXP])
    proxy_max = torch.clamp(row_max, min=PROXY_FILL_LOGIT)
    target_kept = torch.exp(target_diff / temperature if temperature != 1.0 else target_diff) >= keep_threshold
    proxy_target = torch.where(
        target_kept, (packed[:, _TARGET_LOGIT] - proxy_max) / temperature, (PROXY_FILL_LOGIT - proxy_max) / temperature
    )
    outputs[0] = target_diff / temperature - log_sum
    outputs[1] = entropy
    outputs[2] = proxy_target - proxy_log_sum
    if kl_direction == "proxy_to_policy":
        outputs[3] = packed[:, _KL_AUX] / packed[:, _PROXY_SUM_EXP] + (row_max - proxy_max) / temperature + (
            log_sum - proxy_log_sum
        )
    elif kl_direction == "policy_to_proxy":
        outputs[3] = packed[:, _KL_AUX] / packed[:, _SUM_EXP] + (proxy_max - row_max) / temperature + (
            proxy_log_sum - log_sum
        )
    saved[:, _ROW_MAX] = row_max
    saved[:, _LOG_SUM] = log_sum
    saved[:, _ENTROPY] = entropy
    saved[:, _PROXY_LOG_SUM] = proxy_log_sum
    saved[:, _KL] = outputs[3]


_MIN_KEEP_THRESHOLD = 1e-30  # the exp-domain min-p threshold must be a normal fp32 number


def _keep_threshold(log_kappa: float, temperature: float) -> float:
    """Min-p in the exp domain: ``z - M >= ln kappa`` <=> ``exp((z - M) / T) >= kappa ** (1 / T)``; at T = 1 this is
    the authors' ``p >= kappa * max p``. Forward, target and backward all test ``exp(shifted) >= threshold`` with
    the same operations, so a column's kept flag is the same everywhere."""
    return math.exp(log_kappa / temperature)


def _kl_aux(shifted, exp_shifted, keep_threshold, row_max, fill_exp, temperature, kl_direction) -> torch.Tensor:
    """The shard's part of the one sum that differs between proxy and policy: over filtered columns only, where
    the proxy logit is FILL, ``(FILL - z)/T = (FILL - M)/T - shifted``. proxy_to_policy weighs it by the proxy's
    exp (``fill_exp``, constant per row), policy_to_proxy by the policy's exp (negated)."""
    gap = ((PROXY_FILL_LOGIT - row_max) / temperature).unsqueeze(-1) - shifted
    gap.mul_(exp_shifted < keep_threshold)
    if kl_direction == "proxy_to_policy":
        return fill_exp * gap.sum(-1)
    return -(gap.mul_(exp_shifted)).sum(-1)


def _backward_block(logits, tokens, saved, weights, ctx, out, scratch) -> None:
    """Gradient w.r.t. the real columns of one block, written into ``out`` (``[rows, n_valid]``, compute dtype,
    contiguous); ``scratch`` is a same-shaped work buffer.

    With p = softmax(z/T), q the proxy, g_* the upstream gradients:
    d logp_y = (onehot_y - p) / T;  d H = -p (log p + H) / T;
    d KL(q||p) = (p - q) / T;        d KL(p||q) = p (log p - log q - KL) / T.
    """
    layout, temperature = ctx.layout, ctx.temperature
    z = logits[:, : layout.n_valid].to(saved.dtype)
    row_max, log_sum = saved[:, _ROW_MAX], saved[:, _LOG_SUM]
    g_lp, g_h, g_kl = weights.unbind(-1)
    # log p = (z - M)/T - log S, built in place in ``out`` (M and log S apart: M + log S loses log S at |M| ~ 1e4).
    torch.sub(z, row_max.unsqueeze(-1), out=out)
    if temperature != 1.0:
        out.div_(temperature)
    out.sub_(log_sum.unsqueeze(-1))
    # grad/T-free part: p * (a + b log p) with a = -g_lp - g_h H, b = -g_h.
    row_a = (-g_lp - g_h * saved[:, _ENTROPY]).unsqueeze(-1)
    row_b = (-g_h).unsqueeze(-1)
    if ctx.kl_direction is None:
        coef = torch.addcmul(row_a, out, row_b, out=scratch)
        out.exp_().mul_(coef)
    else:
        _backward_kl_into(out, z, saved, row_a, row_b, g_kl.unsqueeze(-1), ctx)
    local_col, in_shard = _target_columns(tokens, layout)
    out.scatter_add_(1, local_col.unsqueeze(1), torch.where(in_shard, g_lp, 0.0).unsqueeze(1))
    if temperature != 1.0:
        out.div_(temperature)


def _backward_kl_into(out, z, saved, row_a, row_b, g_kl, ctx) -> None:
    """``out`` holds log p on entry; leaves ``p (a + b log p) + g_kl * dKL`` (before the target term and 1/T)."""
    temperature = ctx.temperature
    row_max = saved[:, _ROW_MAX]
    shifted = z - row_max.unsqueeze(-1)
    if temperature != 1.0:
        shifted.div_(temperature)
    kept = shifted.exp_() >= _keep_threshold(ctx.log_kappa, temperature)
    del shifted
    proxy_max = torch.clamp(row_max, min=PROXY_FILL_LOGIT)
    proxy_log_sum = saved[:, _PROXY_LOG_SUM].unsqueeze(-1)
    # log q: kept -> log p + log S + (M - Mp)/T - log Sp; filtered -> (FILL - Mp)/T - log Sp (logs, not exps: the
    # shift can be ~-1e4 when all logits are below the fill value).
    kept_shift = (saved[:, _LOG_SUM] + (row_max - proxy_max) / temperature).unsqueeze(-1) - proxy_log_sum
    filled = ((PROXY_FILL_LOGIT - proxy_max) / temperature).unsqueeze(-1) - proxy_log_sum
    log_q = torch.where(kept, out + kept_shift, filled)
    coef = torch.addcmul(row_a, out, row_b)
    if ctx.kl_direction == "proxy_to_policy":
        coef.add_(g_kl)
        out.exp_().mul_(coef).sub_(log_q.exp_().mul_(g_kl))
    else:
        coef.add_(g_kl * (out - log_q - saved[:, _KL].unsqueeze(-1)))
        out.exp_().mul_(coef)


def vocab_parallel_logprob_stats(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    kappa: float = 0.02,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_proxy_kl: bool = False,
    *,
    vocab_size: int | None = None,
    proxy_kl_direction: ProxyKLDirection = "proxy_to_policy",
) -> LogprobStats:
    """Log-probs, entropy, Lp-Reg proxy log-probs (and exact proxy-KL) from this rank's vocab shard.

    Never gathers the vocabulary. Per chunk of ``chunk_size`` tokens: one MAX all-reduce and one packed SUM
    all-reduce on ``group``; the backward pass recomputes the softmax block by block and makes no collective. Extra
    memory: two ``[block, Vs]`` work buffers (a block is at most one chunk: ~1M elements on CPU, ~128M on GPU) plus
    O(N) saved scalars, besides the gradient itself. The input is never modified. bf16/fp16 inputs are
    accumulated in fp32 (outputs are fp32, the logits gradient has the input dtype); float64 stays float64.

    Args:
        logits_shard: ``[..., Vs]`` raw logits of this rank's contiguous vocab slice (rank r: columns
            ``[r*Vs, (r+1)*Vs)``); e.g. megatron's output layer gives ``[S, B, Vs]``.
        tokens: ``[...]`` (the leading shape of ``logits_shard``) integer global ids of the target tokens, in
            ``[0, vocab_size)``.
        group: tensor-parallel process group; None means the default group, or tp=1 when torch.distributed is not
            initialized.
        kappa: min-p threshold of the proxy: keep ``p_v >= kappa * max p`` of the un-tempered distribution.
        temperature: sampling temperature; logprobs/entropy/KL are those of ``softmax(z / temperature)`` and the
            proxy is ``log_softmax(where(kept, z, -1e4) / temperature)`` (the authors' order; see module doc).
        chunk_size: tokens per chunk (None: all tokens in one chunk, fewest collectives).
        with_proxy_kl: also compute the exact full-vocabulary KL between proxy and policy per token.
        vocab_size: the real global vocabulary V; columns at global index >= V are padding and are excluded.
            None means no padding (V = Vs * tp).
        proxy_kl_direction: ``"proxy_to_policy"`` = KL(pi_proxy || pi), gradient ``(pi - pi_proxy)/T`` on the shard
            (the mass-covering pull the global variant uses); ``"policy_to_proxy"`` = KL(pi || pi_proxy), the
            quantity the sampled-token k3 term estimates (large when pi puts mass on filtered tokens, ~1e4 per unit).

    Returns:
        :class:`LogprobStats` with ``[...]``-shaped tensors, identical on every rank of ``group``.

    Raises:
        ValueError: on shape mismatch, non-integer or out-of-range tokens, kappa outside (0, 1], temperature <= 0,
            chunk_size < 1, an unknown KL direction, or a vocab_size that does not fit the shards.
    """
    if logits_shard.dim() < 1 or tuple(logits_shard.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(
            f"logits_shard shape {tuple(logits_shard.shape)} must be tokens shape {tuple(tokens.shape)} + (Vs,)"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa={kappa} must be in (0, 1]; the authors use 0.02")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if _keep_threshold(math.log(kappa), temperature) < _MIN_KEEP_THRESHOLD:
        raise ValueError(
            f"kappa={kappa} ** (1 / temperature={temperature}) is below {_MIN_KEEP_THRESHOLD:g}, outside fp32 "
            "range for the min-p test; use a larger kappa or temperature"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 or None (one chunk)")
    if proxy_kl_direction not in ("proxy_to_policy", "policy_to_proxy"):
        raise ValueError(f"proxy_kl_direction={proxy_kl_direction!r}; use 'proxy_to_policy' or 'policy_to_proxy'")
    layout = _layout(group, logits_shard.shape[-1], vocab_size)
    tokens_1d = tokens.reshape(-1).long()  # gather/scatter indices must be int64
    if tokens_1d.numel():
        low, high = (int(v) for v in torch.aminmax(tokens_1d))
        if low < 0 or high >= layout.vocab_size:
            raise ValueError(f"tokens must lie in [0, vocab_size={layout.vocab_size}); got min {low}, max {high}")
    logits_2d = logits_shard.reshape(-1, logits_shard.shape[-1])
    chunk = chunk_size or max(tokens_1d.numel(), 1)
    logprobs, entropy, proxy_logprobs, proxy_kl = _VocabParallelLogprobStats.apply(
        logits_2d, tokens_1d, layout, math.log(kappa), float(temperature), chunk,
        proxy_kl_direction if with_proxy_kl else None,
    )
    shape = tokens.shape
    return LogprobStats(
        logprobs=logprobs.reshape(shape),
        entropy=entropy.reshape(shape),
        proxy_logprobs=proxy_logprobs.reshape(shape),
        proxy_kl=proxy_kl.reshape(shape) if with_proxy_kl else None,
    )
