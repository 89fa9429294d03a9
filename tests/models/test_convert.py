"""The conversion tools end to end (in-process ``main`` calls; ranks are forked by the package functions):
HF -> megatron TP2xPP2 -> HF is bit-exact for both architectures and readable by transformers, the streaming
export (full tensors read from a TP2xPP2 checkpoint) does not depend on the number of readers, and bad inputs
exit 2 leaving no partial output.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lpreg.models.convert import convert_mcore_to_hf
from tests.support.tiny import tiny_model_dir

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


hf_to_mcore = _tool("convert_hf_to_mcore")
mcore_to_hf = _tool("convert_mcore_to_hf")


def tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tools_roundtrip_tp2_pp2_bit_exact(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(arch)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert hf_to_mcore(["--hf", str(src), "--out", str(mcore), "--tp", "2", "--pp", "2"]) == 0
    assert mcore_to_hf(["--mcore", str(mcore), "--out", str(back)]) == 0
    assert_same(tensors(src), tensors(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert no_leftovers(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(back)).state_dict()
    ours = AutoModelForCausalLM.from_pretrained(str(src)).state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert AutoTokenizer.from_pretrained(str(back)).chat_template is not None
    if arch == "qwen2":  # three readers split the tensors differently: same result
        convert_mcore_to_hf(mcore, tmp_path / "tp1", readers=3)
        assert_same(tensors(src), tensors(tmp_path / "tp1"))


def test_export_without_assets_generates_a_config(tmp_path):
    from transformers import AutoConfig

    src = tiny_model_dir("qwen3")
    mcore = tmp_path / "mcore"
    assert hf_to_mcore(["--hf", str(src), "--out", str(mcore)]) == 0
    shutil.rmtree(mcore / "hf_assets")
    manifest = json.loads((mcore / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("hf_assets/")}
    (mcore / "manifest.json").write_text(json.dumps(manifest))
    assert mcore_to_hf(["--mcore", str(mcore), "--out", str(tmp_path / "back")]) == 0
    config = AutoConfig.from_pretrained(str(tmp_path / "back"))
    original = AutoConfig.from_pretrained(str(src))
    for key in ("model_type", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings", "vocab_size"):
        assert getattr(config, key) == getattr(original, key), key
    assert_same(tensors(src), tensors(tmp_path / "back"))


def _damaged_hf(tmp_path: Path, how: str) -> Path:
    src = tiny_model_dir("qwen2", num_shards=2)
    bad = tmp_path / f"hf-{how}"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-16])
    elif how == "llama":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return bad


@pytest.mark.parametrize("case,args,message", [
    ("tp3", ["--tp", "3"], "parallel.tp=3 must divide"),
    ("pp5", ["--pp", "5"], "exceed model.num_layers=2"),
    ("missing", [], "missing"),
    ("truncated", [], "truncated or corrupt"),
    ("llama", [], "llama"),
])
def test_hf_to_mcore_bad_inputs(case, args, message, tmp_path, capsys):
    hf = _damaged_hf(tmp_path, case) if case in ("missing", "truncated", "llama") else tiny_model_dir("qwen2")
    out = tmp_path / "out"
    assert hf_to_mcore(["--hf", str(hf), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and no_leftovers(tmp_path)


def test_mcore_to_hf_bad_inputs(tmp_path, capsys):
    mcore = tmp_path / "mcore"
    assert hf_to_mcore(["--hf", str(tiny_model_dir("qwen2")), "--out", str(mcore)]) == 0
    assert hf_to_mcore(["--hf", str(tiny_model_dir("qwen2")), "--out", str(mcore)]) == 2
    assert "already exists" in capsys.readouterr().err
    shard = sorted((mcore / "dist").rglob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert mcore_to_hf(["--mcore", str(mcore), "--out", str(tmp_path / "out")]) == 2
    assert ": truncated (" in capsys.readouterr().err
    assert mcore_to_hf(["--mcore", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
