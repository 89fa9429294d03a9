"""The fused vocab-parallel op vs the float64 full-vocabulary reference, at TP 1, 2 and 4 over gloo.

Each rank builds the same full logits from a seed, keeps its contiguous column slice (the last shard padded with
large garbage logits that must be ignored), runs the op, backpropagates a fixed random combination of the outputs
and returns its outputs and gradient shard. The parent checks that all ranks agree bit for bit, that values and the
concatenated gradient match the reference, that padded columns get zero gradient and that the input is untouched.
Not covered here: CUDA kernels (see benchmarks/vocab_parallel.py on a GPU) and megatron's output layer (see
test_in_gptmodel.py).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_lpreg.ops import vocab_parallel
from megatron_lpreg.ops.reference import reference_logprob_stats
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_lpreg.parallel.spawn import run_ranks

# fp32 accumulation over <= 40 columns of O(10) logits: a few ulp of O(10) values (~1e-6); 1e-5 leaves margin.
VALUE_ATOL = 1e-5
# Relative part: with logits of +-1e4 (and the -1e4 proxy fill) the outputs are O(1e4) and fp32 has ~6e-8 spacing.
VALUE_RTOL = 2e-6
# Gradients are compared relative to the largest reference entry (policy_to_proxy KL gradients are O(1e4)).
GRAD_RTOL = 2e-6
# bf16 gradients are rounded to 8 mantissa bits.
GRAD_RTOL_BF16 = 1e-2
PAD_LOGIT = 50.0  # much larger than any real logit: would dominate every statistic if padding leaked in


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    vocab: int
    temperature: float = 1.0
    kappa: float = 0.02
    chunk_size: int | None = None
    kl: str | None = "proxy_to_policy"
    dtype: torch.dtype = torch.float32
    kind: str = "normal"


CASES = [
    Case("basic", (3, 5), 37),
    Case("tempered_chunk1", (2, 4), 37, temperature=0.7, chunk_size=1, kl="policy_to_proxy"),
    Case("chunk_odd_no_kl", (3, 5), 37, temperature=1.3, chunk_size=4, kl=None),
    Case("chunk_all", (3, 5), 37, chunk_size=15, kl="policy_to_proxy"),
    Case("extreme_1e4", (2, 6), 37, kind="extreme"),
    Case("below_fill", (2, 6), 37, temperature=0.9, kind="below_fill", kl="policy_to_proxy"),
    Case("one_kept", (3, 4), 37, kind="one_kept", kl="proxy_to_policy"),
    Case("ties_kappa_1", (2, 3), 37, kappa=1.0, kind="ties", kl="policy_to_proxy"),
    Case("bf16", (3, 5), 37, dtype=torch.bfloat16, chunk_size=7),
    Case("empty", (2, 0), 37),
    Case("tiny_vocab_empty_shard", (2, 3), 5, kind="last_token"),
]


def _case_data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits [*shape, V] (in case.dtype) and tokens [*shape]; several targets in the last columns."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    logits = torch.randn(*case.shape, case.vocab, generator=gen, dtype=torch.float64) * 3
    if case.kind == "extreme":
        logits = torch.where(torch.rand(logits.shape, generator=gen) < 0.5, -1e4, 1e4) + logits
    elif case.kind == "below_fill":
        logits = -2e4 + logits * 3
    elif case.kind == "one_kept":
        logits[..., 11] += 40.0
    elif case.kind == "ties":
        top = logits.amax(-1, keepdim=True)
        logits[..., 2:3] = top + 1.0
        logits[..., 30:31] = top + 1.0
    tokens = torch.randint(0, case.vocab, case.shape, generator=gen)
    flat = tokens.view(-1)
    if flat.numel():
        flat[0] = case.vocab - 1  # target in the last (padded) shard
        flat[-1] = 11 if case.kind == "one_kept" else 0
        if case.kind == "ties":
            flat[1] = 30
    return logits.to(case.dtype), tokens


def _padded_vocab(vocab: int, tp: int) -> int:
    # Like megatron's make_vocab_size_divisible_by (here 4 per rank): every TP size, TP1 included, sees padding.
    return math.ceil(vocab / (4 * tp)) * 4 * tp


def _upstream(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, *case.shape, generator=gen, dtype=torch.float64)


def _run_case(case: Case, tp_rank: int, tp: int, group: dist.ProcessGroup | None) -> dict:
    logits, tokens = _case_data(case)
    shard_vocab = _padded_vocab(case.vocab, tp) // tp
    pad = torch.full((*case.shape, _padded_vocab(case.vocab, tp) - case.vocab), PAD_LOGIT, dtype=case.dtype)
    full = torch.cat([logits, pad], dim=-1)
    shard = full[..., tp_rank * shard_vocab : (tp_rank + 1) * shard_vocab].clone().requires_grad_()
    before = shard.detach().clone()
    stats = vocab_parallel_logprob_stats(
        shard, tokens, group=group, kappa=case.kappa, temperature=case.temperature, chunk_size=case.chunk_size,
        with_proxy_kl=case.kl is not None, vocab_size=case.vocab, proxy_kl_direction=case.kl or "proxy_to_policy",
    )
    weights = _upstream(case).to(torch.float32)
    loss = (weights[0] * stats.logprobs + weights[1] * stats.entropy).sum()
    if stats.proxy_kl is not None:
        loss = loss + (weights[2] * stats.proxy_kl).sum()
    loss.backward()
    return {
        "logprobs": stats.logprobs.detach(), "entropy": stats.entropy.detach(),
        "proxy_logprobs": stats.proxy_logprobs, "proxy_kl": None if stats.proxy_kl is None else stats.proxy_kl.detach(),
        "grad": shard.grad, "unchanged": torch.equal(before, shard.detach()), "proxy_requires_grad":
        stats.proxy_logprobs.requires_grad,
    }


def _rank_cases(rank: int, world_size: int) -> list[dict]:
    return [_run_case(case, rank, world_size, None) for case in CASES]


def _check(case: Case, per_rank: list[dict]) -> dict[str, float]:
    """Compare one case's rank results with the reference; return the max abs errors."""
    first = per_rank[0]
    for other in per_rank[1:]:
        for key in ("logprobs", "entropy", "proxy_logprobs", "proxy_kl"):
            if first[key] is not None:
                assert torch.equal(first[key], other[key]), f"{case.name}: {key} differs across ranks"
    assert all(r["unchanged"] for r in per_rank), f"{case.name}: the op modified its input"
    assert not first["proxy_requires_grad"]
    logits, tokens = _case_data(case)
    leaf = logits.to(torch.float64).requires_grad_()
    ref = reference_logprob_stats(leaf, tokens, kappa=case.kappa, temperature=case.temperature)
    ref_kl = ref.kl_policy_to_proxy if case.kl == "policy_to_proxy" else ref.kl_proxy_to_policy
    weights = _upstream(case).to(torch.float32).to(torch.float64)
    loss = (weights[0] * ref.logprobs + weights[1] * ref.entropy).sum()
    if case.kl is not None:
        loss = loss + (weights[2] * ref_kl).sum()
    if loss.requires_grad:
        loss.backward()
    expected = {"logprobs": ref.logprobs, "entropy": ref.entropy, "proxy_logprobs": ref.proxy_logprobs,
                "proxy_kl": ref_kl if case.kl else None}
    errors = {}
    for key, want in expected.items():
        if want is None:
            assert first[key] is None
            continue
        got = first[key].to(torch.float64)
        torch.testing.assert_close(
            got, want.detach(), atol=VALUE_ATOL, rtol=VALUE_RTOL, msg=lambda m, key=key: f"{case.name} {key}: {m}"
        )
        errors[key] = (got - want).abs().max().item() if got.numel() else 0.0
    grad = torch.cat([r["grad"] for r in per_rank], dim=-1).to(torch.float64)
    assert torch.all(grad[..., case.vocab :] == 0), f"{case.name}: padding got gradient"
    want_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    scale = want_grad.abs().max().item() if want_grad.numel() else 0.0
    rtol = GRAD_RTOL_BF16 if case.dtype == torch.bfloat16 else GRAD_RTOL
    err = (grad[..., : case.vocab] - want_grad).abs().max().item() if grad.numel() else 0.0
    assert err <= rtol * scale + 1e-7, f"{case.name}: grad error {err} vs scale {scale}"
    errors["grad"] = err
    return errors


def test_tp1_without_process_group_matches_reference():
    assert not dist.is_initialized()
    for case in CASES:
        _check(case, [_run_case(case, 0, 1, None)])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_match_reference(tp):
    results = run_ranks(_rank_cases, tp, timeout_s=120)
    for index, case in enumerate(CASES):
        _check(case, [results[rank][index] for rank in range(tp)])


def _rank_cases_in_subgroups(rank: int, world_size: int) -> list[dict]:
    # TP2 x DP2: every rank creates both groups (new_group is collective), then uses its own.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    return [_run_case(case, dist.get_rank(group), 2, group) for case in CASES]


def test_tp_group_inside_a_larger_world():
    results = run_ranks(_rank_cases_in_subgroups, 4, timeout_s=120)
    for pair in ((0, 1), (2, 3)):
        for index, case in enumerate(CASES):
            _check(case, [results[rank][index] for rank in pair])


def test_small_row_blocks_match_reference(monkeypatch):
    # Blocks of 1-3 rows inside each chunk (the CPU path for big vocabularies) must not change any result.
    monkeypatch.setattr(vocab_parallel, "_CPU_BLOCK_ELEMENTS", 25)
    for case in CASES:
        _check(case, [_run_case(case, 0, 1, None)])
    results = run_ranks(_rank_cases, 2, timeout_s=120)
    for index, case in enumerate(CASES):
        _check(case, [results[rank][index] for rank in range(2)])


def _count_collectives(rank: int, world_size: int) -> dict[str, int]:
    counts = {"max": 0, "sum": 0, "other": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        counts["max" if op == dist.ReduceOp.MAX else "sum" if op == dist.ReduceOp.SUM else "other"] += 1
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def forbidden(*args, **kwargs):
        counts["other"] += 1
        raise AssertionError("the op must only use all_reduce")

    dist.all_reduce = counting_all_reduce
    for name in ("all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "barrier"):
        setattr(dist, name, forbidden)
    logits = torch.randn(10, 8, requires_grad=True)
    tokens = torch.arange(10) % 16
    stats = vocab_parallel_logprob_stats(logits, tokens, chunk_size=4, with_proxy_kl=True, vocab_size=15)
    forward = dict(counts)
    (stats.logprobs.sum() + stats.entropy.sum() + stats.proxy_kl.sum()).backward()
    return {"forward": forward, "total": dict(counts)}


def test_collective_budget_two_per_chunk_forward_none_backward():
    results = run_ranks(_count_collectives, 2, timeout_s=60)
    for result in results:
        # 10 tokens in chunks of 4 -> 3 chunks -> 3 MAX + 3 packed SUM; nothing in backward.
        assert result["forward"] == {"max": 3, "sum": 3, "other": 0}
        assert result["total"] == result["forward"]


@pytest.mark.parametrize("direction", ["proxy_to_policy", "policy_to_proxy"])
def test_gradcheck_float64(direction):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])

    def stats(x):
        out = vocab_parallel_logprob_stats(
            x, tokens, kappa=0.3, temperature=0.8, chunk_size=4, with_proxy_kl=True, vocab_size=6,
            proxy_kl_direction=direction,
        )
        return out.logprobs, out.entropy, out.proxy_kl

    tokens[0, 1] = 5  # vocab_size=6: column 6 is padding
    assert torch.autograd.gradcheck(stats, (logits,))


def test_transposed_input_matches_contiguous():
    base = torch.randn(9, 4, dtype=torch.float64)
    tokens = torch.tensor([0, 3, 8, 1])
    contiguous = base.t().contiguous().requires_grad_()
    transposed = base.clone().requires_grad_()  # the op sees transposed.t(): a [4, 9] non-contiguous view
    outputs = []
    for view in (contiguous, transposed.t()):
        stats = vocab_parallel_logprob_stats(view, tokens, with_proxy_kl=True)
        (stats.logprobs.sum() + stats.entropy.sum() + stats.proxy_kl.sum()).backward()
        outputs.append(stats.logprobs)
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(contiguous.grad, transposed.grad.t())


def test_dtypes_fp32_output_for_bf16_float64_preserved_int32_tokens():
    logits = torch.randn(4, 9)
    tokens = torch.tensor([0, 1, 2, 8])
    assert vocab_parallel_logprob_stats(logits.bfloat16(), tokens).logprobs.dtype == torch.float32
    assert vocab_parallel_logprob_stats(logits.double(), tokens).entropy.dtype == torch.float64
    want = vocab_parallel_logprob_stats(logits, tokens).logprobs
    assert torch.equal(vocab_parallel_logprob_stats(logits, tokens.int()).logprobs, want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokens": torch.tensor([0, 9])}, "tokens must lie"),
        ({"tokens": torch.tensor([0, -1])}, "tokens must lie"),
        ({"tokens": torch.tensor([0, 1, 2])}, "shape"),
        ({"tokens": torch.tensor([0.0, 1.0])}, "integer"),
        ({"kappa": 0.0}, "kappa"),
        ({"temperature": 0.0}, "temperature"),
        ({"kappa": 1e-3, "temperature": 0.05}, "kappa"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"vocab_size": 10}, "vocab_size"),
        ({"proxy_kl_direction": "forward"}, "proxy_kl_direction"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"logits_shard": torch.randn(2, 9), "tokens": torch.tensor([0, 1])} | kwargs
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprob_stats(**args)
