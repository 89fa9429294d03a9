"""The bridge on real megatron GPTModels over gloo ranks: HF -> megatron (load_hf_weights) -> HF
(export_hf_weights) reproduces every tensor bit for bit at (tp, pp) in {1,2}^2 and with virtual pipeline stages,
each HF name is yielded by exactly one pipeline stage, and bad HF directories are refused with the names listed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.models.bridge import check_hf_checkpoint, export_hf_weights, load_hf_weights
from megatron_lpreg.models.qwen import build_model_chunks, model_config_from_hf
from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel
from megatron_lpreg.parallel.spawn import RankFailure, run_ranks
from tests.support.tiny import tiny_model_dir


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]
"""(tp, pp, vpp) run inside one 4-rank job; data parallelism takes the remaining ranks (replicas must agree)."""


def _roundtrip_rank(rank: int, world: int, hf_dir: str, layouts: list[tuple[int, int, int]]):
    results = []
    for tp, pp, vpp in layouts:
        parallel_cfg = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
        ctx = init_parallel(parallel_cfg, seed=123)  # random init differs from the HF weights
        try:
            model_cfg = model_config_from_hf(hf_dir)
            chunks = build_model_chunks(model_cfg, parallel_cfg)
            load_hf_weights(chunks, hf_dir, model_cfg, ctx)
            exported = dict(export_hf_weights(chunks, model_cfg, ctx))
            first_only = dict(export_hf_weights(chunks, model_cfg, ctx, all_tp_ranks=False))
            if ctx.tp_rank == 0:  # gather-to-first mode: same stream on TP rank 0, nothing elsewhere
                assert first_only.keys() == exported.keys()
                assert all(torch.equal(t, exported[n]) for n, t in first_only.items())
            else:
                assert first_only == {}
            results.append((ctx.tp_rank, ctx.pp_rank, exported))
        finally:
            destroy_parallel(destroy_process_group=False)
    return results


def _check_roundtrip(hf_dir: Path, layouts: list[tuple[int, int, int]], world: int = 4) -> None:
    per_rank = run_ranks(_roundtrip_rank, world, str(hf_dir), layouts, timeout_s=300, threads_per_rank=1)
    original = hf_tensors(hf_dir)
    for i, (tp, pp, vpp) in enumerate(layouts):
        by_stage: dict[int, dict[str, torch.Tensor]] = {}
        for _tp_rank, pp_rank, exported in (r[i] for r in per_rank):
            reference = by_stage.setdefault(pp_rank, exported)  # TP peers and DP replicas yield the same stream
            assert exported.keys() == reference.keys()
            assert all(torch.equal(t, reference[n]) for n, t in exported.items())
        names = [n for stage in by_stage.values() for n in stage]
        assert len(names) == len(set(names)), f"tp={tp} pp={pp}: a tensor was exported by two pipeline stages"
        assert set(names) == set(original), f"tp={tp} pp={pp}"
        merged = {n: t for stage in by_stage.values() for n, t in stage.items()}
        for name, tensor in original.items():
            assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), (tp, pp, vpp, name)
        if pp > 1:  # stage 0 owns the embedding, the last stage the final norm (and lm_head when untied)
            assert "model.embed_tokens.weight" in by_stage[0] and "model.norm.weight" in by_stage[pp - 1]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_load_export_roundtrip_bit_exact(arch):
    """(tp, pp) in {1,2}^2; qwen3 is tied (the last stage holds a copy of the embedding when pp > 1); vocab 1000
    is padded to 1024."""
    _check_roundtrip(tiny_model_dir(arch), LAYOUTS)


def test_roundtrip_virtual_pipeline_global_layer_numbers():
    _check_roundtrip(tiny_model_dir("qwen2", num_layers=4), [(1, 2, 2)], world=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unused_tensors_are_listed(tmp_path):
    src = tiny_model_dir("qwen2")
    model_cfg = model_config_from_hf(src)
    bad = _copy(src, tmp_path / "bad")
    (file,) = bad.glob("*.safetensors")
    state = load_file(str(file))
    del state["model.layers.1.self_attn.k_proj.bias"]
    state["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(file))
    with pytest.raises(ValueError) as err:
        check_hf_checkpoint(bad, model_cfg)
    assert "missing 1 tensor(s): model.layers.1.self_attn.k_proj.bias" in str(err.value)
    assert "not used by mapping table" in str(err.value) and "model.layers.1.self_attn.extra.weight" in str(err.value)
    # a qwen3 config against qwen2 weights: q/k norms missing, biases unused
    qwen3_cfg = model_config_from_hf(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match="q_norm.weight.*not used.*q_proj.bias"):
        check_hf_checkpoint(src, qwen3_cfg)


def _load_bad_rank(rank: int, world: int, hf_dir: str, cfg_dir: str):
    parallel_cfg = ParallelConfig(tp=1, pp=1)
    ctx = init_parallel(parallel_cfg, seed=0)
    try:
        chunks = build_model_chunks(model_config_from_hf(cfg_dir), parallel_cfg)
        load_hf_weights(chunks, hf_dir, model_config_from_hf(cfg_dir), ctx)
    finally:
        destroy_parallel(destroy_process_group=False)


def test_load_refuses_shape_mismatch(tmp_path):
    # same tensor names, different width: caught per tensor with both shapes named
    narrow = tiny_model_dir("qwen2", ffn_hidden_size=96)
    with pytest.raises(RankFailure, match=r"mlp.linear_fc1.weight: HF tensors .* shape \(192, 64\) but the model "
                                          r"has \(256, 64\)"):
        run_ranks(_load_bad_rank, 1, str(narrow), str(tiny_model_dir("qwen2")), timeout_s=60,
                  threads_per_rank=1)
