"""Pure-torch tests of the declarative Qwen mapping tables and the per-shard transforms (no ranks, no files).

The QKV/SwiGLU layouts are checked against hand-written loops that follow megatron-core's documented layout
(rows per KV group: the group's query heads, then its key head, then its value head; fc1 = [gate_r; up_r] per TP
rank), then HF -> megatron shards -> HF is checked bit for bit for tp in {1, 2, 4}.
"""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.models.mappings import (
    FAMILY_DELTAS,
    Fuse,
    HeadDims,
    mapping_table,
    merge_shards,
    read_shard,
)

NQ, NG, D, H, F, V, LAYERS = 8, 4, 3, 12, 20, 101, 2
HEADS = HeadDims(NQ, NG, D)


def padded(vocab: int, tp: int, divisible_by: int = 16) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def hf_state(arch: str, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
    }
    if not tied:
        shapes["lm_head.weight"] = (V, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (NQ * D, H), p + "self_attn.k_proj.weight": (NG * D, H),
            p + "self_attn.v_proj.weight": (NG * D, H), p + "self_attn.o_proj.weight": (H, NQ * D),
            p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H), p + "mlp.down_proj.weight": (H, F),
        })
        if arch == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (NQ * D,), p + "self_attn.k_proj.bias": (NG * D,),
                           p + "self_attn.v_proj.bias": (NG * D,)})
        else:
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def reader(state: dict[str, torch.Tensor]):
    return lambda name, dim, start, stop: state[name].narrow(dim, start, stop - start).clone()


def to_shards(table, state, tp: int) -> dict[tuple[str, int | None], list[torch.Tensor]]:
    out = {}
    for row in table.rows:
        for layer in range(LAYERS) if row.per_layer else [None]:
            names = row.hf_names(layer)
            lens = [state[n].shape[row.tp_dim or 0] for n in names]
            out[row.mcore, layer] = [
                read_shard(row, layer, reader(state), lens, HEADS, r, tp, padded(V, tp) if row.vocab else None)
                for r in range(tp)
            ]
    return out


def test_family_deltas_are_rows_only():
    q2 = {r.mcore for r in mapping_table("qwen2", tie_word_embeddings=False).rows}
    q3 = {r.mcore for r in mapping_table("qwen3", tie_word_embeddings=False).rows}
    assert q2 - q3 == {"decoder.layers.*.self_attention.linear_qkv.bias"}
    assert q3 - q2 == {"decoder.layers.*.self_attention.q_layernorm.weight",
                       "decoder.layers.*.self_attention.k_layernorm.weight"}
    assert set(FAMILY_DELTAS) == {"qwen2", "qwen3"}
    with pytest.raises(ValueError, match="model.arch='llama'.*supported"):
        mapping_table("llama", tie_word_embeddings=False)


def test_tied_and_te_options():
    tied = mapping_table("qwen3", tie_word_embeddings=True)
    out = tied.resolve("output_layer.weight")
    assert out.row.tied and out.row.hf == ("model.embed_tokens.weight",)
    assert "lm_head.weight" not in tied.expected_hf_names(LAYERS)
    assert tied.is_ignored("lm_head.weight")
    te = mapping_table("qwen2", tie_word_embeddings=False, fused_norms=True)
    assert te.resolve("decoder.layers.3.input_layernorm.weight") is None
    res = te.resolve("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
    assert res.layer == 3 and res.row.hf_names(3) == ("model.layers.3.input_layernorm.weight",)


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen3", True)])
def test_expected_names_cover_hf_state_exactly(arch, tied):
    table = mapping_table(arch, tie_word_embeddings=tied)
    assert table.expected_hf_names(LAYERS) == set(hf_state(arch, tied))


def test_describe_lists_every_row():
    table = mapping_table("qwen2", tie_word_embeddings=False)
    text = table.describe()
    assert len(text.splitlines()) == len(table.rows) + 2
    assert "linear_qkv.bias" in text and "qkv" in text and "tp dim 1" in text


def test_qkv_layout_matches_hand_loop():
    state = hf_state("qwen2", tied=False)
    table = mapping_table("qwen2", tie_word_embeddings=False)
    row = table.resolve("decoder.layers.0.self_attention.linear_qkv.weight").row
    (fused,) = to_shards(mapping_table("qwen2", tie_word_embeddings=False), state, 1)[row.mcore, 0]
    q, k, v = (state[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    expected = []
    for g in range(NG):
        for h in range(NQ // NG):
            head = g * (NQ // NG) + h
            expected.append(q[head * D:(head + 1) * D])
        expected += [k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]]
    assert torch.equal(fused, torch.cat(expected))
    # megatron splits the fused tensor by contiguous rows over TP (whole KV groups per rank)
    for tp in (2, 4):
        shards = to_shards(mapping_table("qwen2", tie_word_embeddings=False), state, tp)[row.mcore, 0]
        assert torch.equal(torch.cat(shards), fused)


def test_gate_up_is_fused_per_rank():
    state = hf_state("qwen3", tied=False)
    table = mapping_table("qwen3", tie_word_embeddings=False)
    shards = to_shards(table, state, 2)["decoder.layers.*.mlp.linear_fc1.weight", 1]
    gate, up = state["model.layers.1.mlp.gate_proj.weight"], state["model.layers.1.mlp.up_proj.weight"]
    half = F // 2
    assert torch.equal(shards[0], torch.cat([gate[:half], up[:half]]))
    assert torch.equal(shards[1], torch.cat([gate[half:], up[half:]]))
    assert not torch.equal(torch.cat(shards), torch.cat([gate, up]))


def test_row_parallel_and_vocab_padding():
    state = hf_state("qwen3", tied=False)
    table = mapping_table("qwen3", tie_word_embeddings=False)
    shards = to_shards(table, state, 2)
    proj = shards["decoder.layers.*.self_attention.linear_proj.weight", 0]
    assert [s.shape for s in proj] == [(H, NQ * D // 2)] * 2
    emb = shards["embedding.word_embeddings.weight", None]
    vp = padded(V, 2)
    assert [s.shape for s in emb] == [(vp // 2, H)] * 2
    full = torch.cat(emb)
    assert torch.equal(full[:V], state["model.embed_tokens.weight"]) and not full[V:].any()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen3", False), ("qwen3", True), ("qwen2", True)])
def test_hf_to_mcore_to_hf_is_bit_exact(arch, tied, tp):
    state = hf_state(arch, tied, seed=tp)
    table = mapping_table(arch, tie_word_embeddings=tied)
    back: dict[str, torch.Tensor] = {}
    for (mcore, layer), shards in to_shards(table, state, tp).items():
        row = table.resolve(mcore.replace("*", str(layer))).row
        if row.tied:
            continue
        for name, tensor in merge_shards(row, layer, shards, HEADS, vocab_size=V):
            assert name not in back, f"{name} exported twice"
            back[name] = tensor
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
        assert back[name].dtype == tensor.dtype


def test_fuse_kinds_are_exercised():
    kinds = {r.fuse for r in mapping_table("qwen2", tie_word_embeddings=False).rows}
    assert kinds == set(Fuse)
