"""The offline tiny Qwen checkpoint: deterministic, loadable by transformers, Qwen2.5-style chat template."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_lpreg.models.tiny import make_tiny_model


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, arch: str) -> None:
    a = _digests(make_tiny_model(tmp_path / "a", arch, seed=3))
    b = _digests(make_tiny_model(tmp_path / "b", arch, seed=3))
    c = _digests(make_tiny_model(tmp_path / "c", arch, seed=4))
    assert a == b
    assert [name for name in a if a[name] != c[name]] == ["model.safetensors"]


def test_qwen2_layout(tiny_qwen2: Path) -> None:
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vocab_size"] == 1000 and config["vocab_size"] % 128 != 0
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 1e6
    with safe_open(str(tiny_qwen2 / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (2 * 16, 64)
    assert "lm_head.weight" in keys and "model.layers.1.self_attn.q_proj.bias" in keys
    assert not any("q_norm" in k for k in keys)


def test_qwen3_layout(tiny_qwen3: Path) -> None:
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == 32 != config["hidden_size"] // 4
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
    with safe_open(str(tiny_qwen3 / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (4 * 32, 64)
        assert f.get_tensor("model.layers.0.self_attn.k_norm.weight").shape == (32,)
    assert "lm_head.weight" not in keys and not any(k.endswith(".bias") for k in keys)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_loads_in_transformers_and_runs(arch: str, tiny_qwen2: Path, tiny_qwen3: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_qwen2 if arch == "qwen2" else tiny_qwen3
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.equal(model.lm_head.weight, embed) == (arch == "qwen3")
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 1000)
    # Weights are scaled so that the next-token distribution is neither uniform nor one-hot.
    logp_max = torch.log_softmax(logits, -1).max(-1).values
    assert (logp_max > -6.5).all() and (logp_max < -0.05).all()


def test_tokenizer_chat_template_and_special_tokens(tiny_qwen2: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    raw = Tokenizer.from_file(str(tiny_qwen2 / "tokenizer.json"))
    n_bpe = raw.get_vocab_size() - 3
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        n_bpe, n_bpe + 1, n_bpe + 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and len(tok) <= 1000
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    sample = "Hello 123, \\boxed{85}  tabs\tand ünïcode 日本<|im_end|>"
    ids = tok(sample)["input_ids"]
    assert ids == raw.encode(sample).ids and ids[-1] == n_bpe + 2
    assert tok.decode(ids) == sample
    generation = json.loads((tiny_qwen2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [n_bpe + 2, n_bpe]


def test_sharded_output_has_index(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "m", "qwen2", num_shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    single = make_tiny_model(tmp_path / "single", "qwen2")
    with safe_open(str(single / "model.safetensors"), "pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}
    got = {}
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_bad_arguments_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch='llama'"):
        make_tiny_model(tmp_path / "x", "llama")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        make_tiny_model(tmp_path / "x", "qwen2", num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size=100"):
        make_tiny_model(tmp_path / "x", "qwen2", vocab_size=100)
    assert list(tmp_path.iterdir()) == []
    make_tiny_model(tmp_path / "x", "qwen2")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_tiny_model(tmp_path / "x", "qwen2")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_cli_writes_model(tmp_path: Path) -> None:
    from tools.make_tiny_model import main

    main(["--arch", "qwen3", "--out", str(tmp_path / "cli"), "--vocab-size", "777", "--layers", "3"])
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"]) == (777, 3)
