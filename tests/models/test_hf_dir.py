"""The one HF-directory reader/writer: config.json errors name the file, EOS ids and dtypes as the engines need
them, safetensors listing/streaming/slicing on single-file and sharded directories, damaged shards refused before
any weight is read, and the streaming writer read back by the reference safetensors reader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.models import hf_dir
from tests.support.tiny import tiny_model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_read_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"no HF config at {tmp_path / 'config.json'}"):
        hf_dir.read_config(tmp_path)
    assert hf_dir.read_config(tmp_path, missing_ok=True) == {} == hf_dir.read_config("", missing_ok=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        hf_dir.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        hf_dir.read_config(tmp_path / "config.json")


def test_eos_ids_dtype_and_tokenizer(tmp_path: Path) -> None:
    src = tiny_model_dir("qwen2")
    config = hf_dir.read_config(src)
    assert hf_dir.eos_token_ids(src) == hf_dir.eos_token_ids(src, config)
    assert set(hf_dir.eos_token_ids(src)) == {config["eos_token_id"], config["pad_token_id"]}  # generation config
    assert hf_dir.has_tokenizer(src) and not hf_dir.has_tokenizer(tmp_path) and not hf_dir.has_tokenizer("")
    assert hf_dir.eos_token_ids(tmp_path) == ()
    assert hf_dir.declared_dtype({"torch_dtype": "bfloat16"}) == "bfloat16" == hf_dir.declared_dtype(
        {"dtype": "torch.bfloat16"})
    assert hf_dir.torch_dtype({"dtype": "bfloat16"}) is torch.bfloat16 and hf_dir.torch_dtype(config) is torch.float32
    assert hf_dir.declared_dtype({}) is None and hf_dir.torch_dtype({"torch_dtype": "Tensor"}) is None


@pytest.mark.parametrize("num_shards", [1, 2])
def test_listing_streaming_and_slicing(num_shards: int) -> None:
    src = tiny_model_dir("qwen3", num_shards=num_shards)
    files = hf_dir.safetensors_files(src)
    assert len(files) == num_shards and all(f.is_file() for f in files)
    reference: dict[str, torch.Tensor] = {}
    for file in files:
        reference.update(load_file(str(file)))
    streamed = dict(hf_dir.iter_tensors(src))
    assert sorted(hf_dir.tensor_names(src)) == sorted(streamed) == sorted(reference)
    assert all(torch.equal(streamed[n], reference[n]) for n in reference)
    embed = reference["model.embed_tokens.weight"]
    assert torch.equal(hf_dir.read_rows(src, "model.embed_tokens.weight", 3), embed[:3])
    view = hf_dir.HFSafetensors(src)
    assert view.names() == set(reference) and view.shape("model.embed_tokens.weight") == list(embed.shape)
    assert torch.equal(view.read("model.embed_tokens.weight", 1, 2, 5), embed[:, 2:5])
    with pytest.raises(ValueError, match="not found"):
        hf_dir.read_rows(src, "nope", 1)


def test_missing_truncated_and_absent_shards(tmp_path: Path) -> None:
    src = tiny_model_dir("qwen3", num_shards=2)
    index = json.loads((src / hf_dir.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    missing = _copy(src, tmp_path / "missing")
    (missing / files[1]).unlink()
    with pytest.raises(ValueError, match=f"missing: {files[1]}"):
        hf_dir.HFSafetensors(missing)
    truncated = _copy(src, tmp_path / "truncated")
    data = (truncated / files[0]).read_bytes()
    (truncated / files[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"shard {files[0]} is truncated or corrupt"):
        hf_dir.HFSafetensors(truncated)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no \\*.safetensors files"):
        hf_dir.safetensors_files(tmp_path / "empty")


def test_safetensors_writer_matches_reference_reader(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "b": torch.randn(7, generator=gen),
               "c.idx": torch.arange(4, dtype=torch.int64), "d.empty": torch.zeros(0, 3),
               "e.view": torch.randn(6, 4, generator=gen)[1:5]}
    shards = hf_dir.write_safetensors(iter(tensors.items()), tmp_path, max_shard_bytes=64)
    back: dict[str, torch.Tensor] = {}
    for file in sorted(tmp_path.glob("*.safetensors")):
        back.update(load_file(str(file)))
    assert set(back) == set(tensors) and len(set(shards.weight_map.values())) > 1
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert shards.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    with pytest.raises(ValueError, match="appears twice"):
        hf_dir.write_safetensors(iter([("x", torch.zeros(1)), ("x", torch.zeros(1))]), tmp_path / "..")


def test_finish_hf_dir_renames_indexes_and_copies_assets(tmp_path: Path) -> None:
    src = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    out.mkdir()
    tensors = dict(hf_dir.iter_tensors(src))
    names = sorted(tensors)
    maps = [hf_dir.write_safetensors(((n, tensors[n]) for n in part), out, prefix=f"part{i:03d}", max_shard_bytes=1)
            for i, part in enumerate((names[:5], names[5:]))]
    hf_dir.finish_hf_dir(out, maps, src, {"ignored": True})
    files = hf_dir.safetensors_files(out)
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert dict(hf_dir.iter_tensors(out)).keys() == tensors.keys()
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes() and hf_dir.has_tokenizer(out)
    bare = tmp_path / "bare"
    bare.mkdir()
    hf_dir.finish_hf_dir(bare, [hf_dir.write_safetensors(iter([("w", torch.ones(2))]), bare)], None, {"x": 1})
    assert hf_dir.read_config(bare) == {"x": 1} and not hf_dir.has_tokenizer(bare)
