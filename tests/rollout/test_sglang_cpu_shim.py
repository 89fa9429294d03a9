"""The sgl_kernel shim that lets real SGLang run on CPU (tools/sglang_cpu, installed into .venv-sglang): importable,
every op a loud error, no torch ops registered (so SGLang keeps its torch-native path). The server itself runs on it
in the ``sglang``-marked tests (tests/rollout/test_sglang_real.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHIM = Path(__file__).resolve().parents[2] / "tools" / "sglang_cpu" / "sgl_kernel" / "__init__.py"


@pytest.fixture()
def shim():
    spec = importlib.util.spec_from_file_location("sgl_kernel_shim_under_test", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_sglang_imports_at_module_level_exist_and_raise_when_called(shim):
    from_import = shim.copy_all_layer_kv_cache_cpu  # what `from sgl_kernel import ...` looks up
    assert from_import.__name__ == "copy_all_layer_kv_cache_cpu" and shim.IS_SHIM
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.copy_all_layer_kv_cache_cpu .*CPU shim"):
        from_import(torch.zeros(1))


def test_dunder_lookups_fail_and_no_torch_ops_are_registered(shim):
    with pytest.raises(AttributeError):
        shim.__wrapped__  # noqa: B018 (introspection must not see a function here)
    # SGLang's AMX check (sglang/srt/utils/common.py::_is_intel_amx_backend_available) must stay False
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
