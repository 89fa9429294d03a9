"""What runs real SGLang on CPU, without SGLang: the sgl_kernel shim (tools/sglang_cpu, installed into .venv-sglang:
importable, every op a loud error, no torch ops registered, so SGLang keeps its torch-native path), the CPU launch
command and environment of ``rollout.sglang_device=cpu``, and the config refusing NCCL there. The server itself runs
on them in the ``sglang``-marked tests (tests/rollout/test_sglang_real.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.sglang_servers import CPU_SERVER_ARGS, server_command, server_env

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


def test_a_cpu_server_gets_the_cpu_flags_and_environment_and_a_gpu_server_does_not():
    cpu = RolloutConfig(engine="sglang", sglang_device="cpu", dtype="float32", weight_sync_backend="gloo")
    cmd = server_command(cpu, "/m", host="127.0.0.1", port=30000, seed=0)
    assert " ".join(CPU_SERVER_ARGS) in " ".join(cmd) and cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enable-memory-saver" not in cmd  # it needs libcuda: the server would exit at start
    assert server_env(cpu, {"PATH": "/bin"}) == {"PATH": "/bin", "SGLANG_USE_CPU_ENGINE": "1"}
    gpu = RolloutConfig(engine="sglang")
    gpu_cmd = server_command(gpu, "/m", host="127.0.0.1", port=30000, seed=0)
    assert "--device" not in gpu_cmd and "--dtype" not in gpu_cmd  # dtype auto: SGLang's own choice
    assert server_env(gpu, {"PATH": "/bin"}) == {"PATH": "/bin"}


def test_nccl_is_refused_for_distributed_sync_to_a_cpu_server():
    cfg = RolloutConfig(engine="sglang", sglang_device="cpu", mode="separate", num_gpus=1)
    with pytest.raises(ConfigError, match="weight_sync_backend=gloo"):
        cfg.validate()
    RolloutConfig(engine="sglang", sglang_device="cpu", mode="separate", num_gpus=1,
                  weight_sync_backend="gloo").validate()
