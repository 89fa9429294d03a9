"""The packed THD path (trainer.packing with an attention that reads megatron's PackedSeqParams, i.e. Transformer
Engine) on CPU: the PackedSeqParams built for a packed row, a float64 check of the TE stand-in
(tests/support/thd_attention.py), and on real megatron ranks (TP1, TP2) the same log-probs (within 1e-5, fp32) and
gradients as the padded path, RoPE restarting at every sequence, and a wrong ``cu_seqlens`` caught.

Not covered here (needs a GPU with transformer_engine): TE's own kernels, its bf16 numerics, the fused THD RoPE
kernel (``apply_rope_fusion``) and sequence parallelism (the local spec refuses it on CPU).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_lpreg.models.packed import thd_packed_seq_params, thd_unsupported_reason
from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.trainer.batch import micro_batch_size_for, pack_micro_batches, sequence_lengths
from tests.support.thd_attention import varlen_causal_attention
from tests.support.tiny import tiny_model_dir
from tests.trainer.test_packing import _long_tailed_batch
from tests.trainer.test_policy import _cfg, _grads, _policy

LOGPROB_ATOL = 1e-5
"""The issue's bound for packed vs padded log-probs in fp32."""
GRAD_RTOL = 1e-4
"""Packed and padded rows sum attention over the same keys but in differently shaped matmuls (fp32 rounding)."""
ROPE_ATOL = 1e-5
"""Layer-1 queries after RoPE: the same fp32 rotation of the same embeddings, up to matmul rounding."""
WRONG_MIN = 1e-3
"""A merged segment boundary moves log-probs and rotated queries by far more than rounding (measured ~1e-1)."""
BUDGET = 60


def test_packed_seq_params_for_lengths():
    p = thd_packed_seq_params([5, 6, 2], "cpu")
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 5, 11, 13]
    assert p.cu_seqlens_kv is p.cu_seqlens_q
    assert p.max_seqlen_q == p.max_seqlen_kv == 6 and isinstance(p.max_seqlen_q, int)
    assert p.cu_seqlens_q_padded is None and p.cu_seqlens_kv_padded is None
    assert thd_packed_seq_params([4], "cpu").cu_seqlens_q.tolist() == [0, 4]
    for bad in ([], [3, 0, 2]):
        with pytest.raises(ValueError, match="segment lengths"):
            thd_packed_seq_params(bad, "cpu")


def _cu_seqlens_placement(rank, world):
    from tests.parallel.test_device_discipline import _simulated_ctx
    from tests.support.device_check import on_host

    ctx = _simulated_ctx()  # ctx.device says cuda:0; host-built tensors are tagged
    return on_host(thd_packed_seq_params([3, 4], ctx.device).cu_seqlens_q), on_host(
        thd_packed_seq_params([3, 4], "cpu").cu_seqlens_q)


def test_cu_seqlens_are_built_on_the_given_device():
    on_device_host, on_cpu_host = run_ranks(_cu_seqlens_placement, 1, timeout_s=120)[0]
    assert not on_device_host and on_cpu_host  # TE reads cu_seqlens on the GPU; the checker would catch a host one


def test_te_version_rule():
    assert thd_unsupported_reason(None) == "transformer_engine is not importable"
    assert "older than 1.7.0" in thd_unsupported_reason("1.6.0")
    assert thd_unsupported_reason("1.7.0") is None and thd_unsupported_reason("2.8.0") is None


def test_segment_lengths_cover_the_row():
    batch = _long_tailed_batch()
    lengths = sequence_lengths(batch)
    for kwargs in ({}, {"uniform": True}, {"multiple": 8}):
        packs = pack_micro_batches(batch, BUDGET, **kwargs)
        for p in packs:
            real = [lengths[i] for i in p.indices]
            assert sum(p.segment_lengths) == p.seq_len and p.segment_lengths[:len(real)] == real
            tail = p.segment_lengths[len(real):]
            assert tail == ([p.seq_len - sum(real)] if p.seq_len > sum(real) else [])
            assert p.seq_len % kwargs.get("multiple", 1) == 0
    assert any(len(p.segment_lengths) > len(p.indices) for p in pack_micro_batches(batch, BUDGET, multiple=8))


def _reference(query, key, value, cu, scale):
    """Per-sequence causal attention of the unpacked sequences, float64 (torch's SDPA, GQA by repetition)."""
    out = []
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = (x[s:e].transpose(0, 1) for x in (query, key, value))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        out.append(attn.transpose(0, 1))
    return torch.cat(out).reshape(int(cu[-1]), -1)


def test_the_stand_in_is_varlen_causal_attention_and_reads_cu_seqlens():
    g = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 13, 4, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    p = thd_packed_seq_params([5, 6, 2], "cpu")
    scale = d ** -0.5
    got = varlen_causal_attention(q, k, v, cu_seqlens=p.cu_seqlens_q, max_seqlen=p.max_seqlen_q, softmax_scale=scale)
    assert got.dtype == torch.float64 and got.shape == (t, hq * d)
    torch.testing.assert_close(got, _reference(q, k, v, p.cu_seqlens_q, scale), rtol=0, atol=1e-12)
    # TE's padded layout: real tokens at cu_seqlens_padded offsets, padding outputs zero
    padded = torch.tensor([0, 7, 13], dtype=torch.int32)
    real = torch.tensor([0, 5, 9], dtype=torch.int32)
    got = varlen_causal_attention(q, k, v, cu_seqlens=real, max_seqlen=5, softmax_scale=scale, cu_seqlens_padded=padded)
    torch.testing.assert_close(got[:5], _reference(q[:5], k[:5], v[:5], real[:2], scale), rtol=0, atol=1e-12)
    second = torch.tensor([0, 4], dtype=torch.int32)
    torch.testing.assert_close(got[7:11], _reference(q[7:11], k[7:11], v[7:11], second, scale), rtol=0, atol=1e-12)
    assert not got[5:7].any() and not got[11:].any()
    # honest: moved boundaries change the result; what TE would reject is refused
    shifted = torch.tensor([0, 6, 11, 13], dtype=torch.int32)
    wrong = varlen_causal_attention(q, k, v, cu_seqlens=shifted, max_seqlen=6, softmax_scale=scale)
    assert (wrong - _reference(q, k, v, p.cu_seqlens_q, scale)).abs().max() > 0.1
    bad = {
        "int32": dict(cu_seqlens=p.cu_seqlens_q.long(), max_seqlen=6),
        "cover": dict(cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32), max_seqlen=6),
        "max_seqlen": dict(cu_seqlens=p.cu_seqlens_q, max_seqlen=5),
        "decrease": dict(cu_seqlens=torch.tensor([0, 6, 5, 13], dtype=torch.int32), max_seqlen=8),
    }
    for match, kwargs in bad.items():
        with pytest.raises(ValueError, match=match):
            varlen_causal_attention(q, k, v, softmax_scale=scale, **kwargs)


def _merged_first_boundary(real_builder):
    """A wrong PackedSeqParams builder: the row's first two segments become one (still a well-formed layout)."""
    def build(segment_lengths, device):
        lengths = list(segment_lengths)
        return real_builder([lengths[0] + lengths[1]] + lengths[2:] if len(lengths) > 1 else lengths, device)
    return build


def _layer1_queries(policy, batch, captured, packs, mbs) -> dict[int, torch.Tensor]:
    """Sequence index -> its layer-1 query after RoPE ([n, Hq, D]) from the captured core-attention inputs."""
    lengths = sequence_lengths(batch)
    out = {}
    if policy.packing:
        for p, q in zip(packs, captured):  # q: [T, Hq, D]
            start = 0
            for i in p.indices:
                out[i] = q[start:start + lengths[i]]
                start += lengths[i]
    else:
        for i, n in enumerate(lengths):  # q: [L, mbs, Hq, D]
            out[i] = captured[i // mbs][:n, i % mbs]
    return out


def _thd_vs_padded(rank, world, cfg, pack_multiple):
    from megatron_lpreg.models import qwen
    from megatron_lpreg.trainer import policy as policy_module
    from tests.support.thd_attention import ThdReferenceAttention, thd_layer_spec

    local_spec = qwen.layer_spec
    qwen.layer_spec = lambda model_cfg: thd_layer_spec(local_spec(model_cfg))  # TE's role: THD core attention
    policy, ctx = _policy(cfg, micro_batch_tokens=BUDGET)
    core = policy.raw_chunks[0].decoder.layers[0].self_attention.core_attention  # this stage's first layer
    assert isinstance(core, ThdReferenceAttention) and policy.packed_thd
    policy.pack_multiple = pack_multiple  # as sequence parallelism would: a tail padding segment in some rows
    batch = _long_tailed_batch()
    packs = pack_micro_batches(batch, BUDGET, multiple=pack_multiple, uniform=ctx.pp_size > 1)
    mbs = micro_batch_size_for(batch.seq_len, BUDGET)
    captured: list[torch.Tensor] = []
    core.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))

    def run(packing):
        policy.packing = packing
        captured.clear()
        with_old = policy.compute_old_logprobs(batch)
        queries = _layer1_queries(policy, batch, captured, packs, mbs)
        policy.accumulate_gradients(batch, global_valid_tokens=float(batch.loss_mask.sum()))
        return with_old.old_logprobs * batch.loss_mask, with_old.proxy_logprobs * batch.loss_mask, queries

    padded = run(False)
    grads_padded = _grads(policy)
    thd = run(True)
    grads_thd = _grads(policy)
    real_builder = policy_module.thd_packed_seq_params
    policy_module.thd_packed_seq_params = _merged_first_boundary(real_builder)
    wrong = run(True)
    policy_module.thd_packed_seq_params = real_builder

    def max_diff(a, b):
        return float((a - b).abs().max())

    later = [p.indices[1] for p in packs if len(p.indices) > 1]  # second sequences: their RoPE must restart
    return {
        "logprob": max_diff(thd[0], padded[0]), "proxy": max_diff(thd[1], padded[1]),
        "grad": max(max_diff(grads_thd[k], grads_padded[k]) / float(grads_padded[k].abs().max().clamp(min=1e-12))
                    for k in grads_padded),
        "rope": max(max_diff(thd[2][i], padded[2][i]) for i in range(batch.num_sequences)),
        "wrong_logprob": max_diff(wrong[0], padded[0]),
        "wrong_rope": max(max_diff(wrong[2][i], padded[2][i]) for i in later),
        "rank": rank,
    }


@pytest.mark.parametrize("arch,tp,pp,multiple", [("qwen2", 1, 1, 1), ("qwen2", 2, 1, 1), ("qwen3", 1, 1, 8),
                                                 ("qwen2", 1, 2, 1)])
def test_thd_logprobs_and_gradients_equal_padded(arch, tp, pp, multiple):
    """PP2 packs every row to the longest (a tail padding segment); multiple=8 does it as sequence parallelism."""
    cfg = _cfg(tiny_model_dir(arch), algo="grpo", tp=tp, pp=pp, world=tp * pp, loss_agg="global_token_mean")
    for r in run_ranks(_thd_vs_padded, tp * pp, cfg, multiple, timeout_s=300):
        assert r["logprob"] <= LOGPROB_ATOL and r["proxy"] <= LOGPROB_ATOL, r
        assert r["grad"] <= GRAD_RTOL, r
        assert r["rope"] <= ROPE_ATOL, r
        assert r["wrong_logprob"] > WRONG_MIN and r["wrong_rope"] > WRONG_MIN, r  # the check can fail
        print(f"thd vs padded ({arch}, tp={tp}, pp={pp}, multiple={multiple}, rank={r['rank']}): " + ", ".join(
            f"{k}={v:.3g}" for k, v in r.items() if k != "rank"))


def test_te_spec_packing_is_refused_only_without_thd(monkeypatch):
    from megatron_lpreg.config import ModelConfig
    from megatron_lpreg.trainer import policy as policy_module

    model = dataclasses.replace(ModelConfig(), transformer_impl="auto")
    policy_module._check_packing_supported(model)  # no CUDA/TE here: local spec, block-diagonal mask
    monkeypatch.setattr(policy_module, "use_transformer_engine", lambda _cfg: True)
    monkeypatch.setattr(policy_module, "installed_te_version", lambda: "1.6.0")
    with pytest.raises(ValueError, match="older than 1.7.0.*model.transformer_impl=local or trainer.packing=false"):
        policy_module._check_packing_supported(model)
    monkeypatch.setattr(policy_module, "installed_te_version", lambda: "2.8.0")
    policy_module._check_packing_supported(model)


def _gpu_check_on_stand_in(rank, world, hf_dir, dtype):
    from megatron_lpreg.gpucheck.packing import packed_thd_parity
    from megatron_lpreg.models import qwen
    from tests.support.thd_attention import thd_layer_spec

    without = packed_thd_parity(hf_dir, dtype, impl="local")
    local_spec = qwen.layer_spec
    qwen.layer_spec = lambda model_cfg: thd_layer_spec(local_spec(model_cfg))
    return without, packed_thd_parity(hf_dir, dtype, impl="local")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gpu_check_of_the_thd_path_runs_on_the_stand_in(dtype):
    """gpucheck's model_parity compares TE's THD path with the padded one on GPU nodes; here its code runs on the
    stand-in (the numbers are this stand-in's, not TE's), and without a THD attention it reports so."""
    from megatron_lpreg.models.parity import DEFAULT_TOLERANCE

    without, result = run_ranks(_gpu_check_on_stand_in, 1, tiny_model_dir("qwen3"), dtype, timeout_s=300)[0]
    assert "does not read PackedSeqParams" in without["error"]
    bound = LOGPROB_ATOL if dtype == "float32" else DEFAULT_TOLERANCE[dtype]
    assert result["max_abs_logprob_diff"] <= bound and result["tolerance"] == DEFAULT_TOLERANCE[dtype], result
    print(f"gpucheck packed_thd on the stand-in ({dtype}): {result}")
