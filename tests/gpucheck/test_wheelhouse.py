"""The GPU-node wheelhouse: pins in step with setup.py and the tested venv, the pip command, the size limit.

The real download (``make gpu-wheelhouse``) needs the package index and is not run here; these tests stub pip.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from megatron_lpreg.gpucheck import wheelhouse


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pins_match_setup_py_and_the_tested_venv():
    declared = {}
    for req in metadata.requires("megatron_lpreg") or []:
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)\s*$", req)
        if match:
            declared[_norm(match.group(1))] = match.group(2)
    for req in wheelhouse.GPU_NODE_REQUIREMENTS:
        name, version = req.split("==")
        if _norm(name) in declared:  # a direct dependency: the same pin as setup.py
            assert declared[_norm(name)] == version, (req, declared[_norm(name)])
        assert metadata.version(name) == version, f"{req}: the venv the tests run in has {metadata.version(name)}"
    names = {_norm(r.split("==")[0]) for r in wheelhouse.GPU_NODE_REQUIREMENTS}
    assert {"megatron-core", "nltk", "math-verify"} <= names
    for heavy in ("torch", "ray", "vllm", "sglang", "transformer-engine", "transformers"):
        assert all(not _norm(r).startswith(heavy + "=") for r in wheelhouse.GPU_NODE_REQUIREMENTS)


def test_download_command_is_binary_only_no_deps_cpython_312(tmp_path):
    cmd = wheelhouse.download_command(tmp_path, ["nltk==3.10.4"])
    assert cmd[:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert "manylinux2014_x86_64" in cmd and cmd[-1] == "nltk==3.10.4"


def _fake_pip(sizes: dict[str, int]):
    def pip(args):
        out = Path(args[args.index("--dest") + 1] if "--dest" in args else args[args.index("--wheel-dir") + 1])
        for name, size in sizes.items():
            if ("megatron_lpreg" in name) == (args[0] == "wheel"):
                (out / name).write_bytes(b"\0" * size)
    return pip


def test_build_writes_requirements_and_empties_a_stale_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(wheelhouse, "_pip", _fake_pip({"a-1-py3-none-any.whl": 1000,
                                                       "megatron_lpreg-0.1.0-py3-none-any.whl": 24}))
    out = tmp_path / "wh"
    out.mkdir()
    (out / "a-0-py3-none-any.whl").write_bytes(b"old")  # a stale second version would break the install
    house = wheelhouse.build_wheelhouse(out, tmp_path, requirements=["a==1"])
    assert [w.name for w in house.wheels] == ["a-1-py3-none-any.whl", "megatron_lpreg-0.1.0-py3-none-any.whl"]
    assert house.total_bytes == 1024
    assert (out / wheelhouse.REQUIREMENTS_FILE).read_text() == "a\nmegatron_lpreg\n"
    assert "total 0.00 MiB in 2 wheels" in house.describe()


def test_build_refuses_more_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(wheelhouse, "_pip", _fake_pip({"big-1-py3-none-any.whl": 3000,
                                                       "megatron_lpreg-0.1.0-py3-none-any.whl": 10}))
    with pytest.raises(ValueError, match=r"wheelhouse .* > 0 MiB:\nbig-1-py3-none-any.whl"):
        wheelhouse.build_wheelhouse(tmp_path / "wh", tmp_path, requirements=["big==1"], max_bytes=2048)
