"""An importable ``sgl_kernel`` with no compiled ops, so SGLang 0.5.23 runs on a CPU without its kernel wheel.

SGLang picks its compiled CPU kernels only when ``torch.ops.sgl_kernel`` holds ``convert_weight_packed`` (Intel AMX,
``sglang/srt/utils/common.py::_is_intel_amx_backend_available``); this module registers no torch ops, so SGLang
always falls back to its torch-native backend. It still imports names from ``sgl_kernel`` at module level when
``SGLANG_USE_CPU_ENGINE=1`` (``sglang/kernels/ops/kvcache/cache_move.py``: ``copy_all_layer_kv_cache_cpu``;
``sglang/srt/mem_cache/allocation.py``: ``assign_req_to_token_pool_cpu``, only used by speculative decoding).
Every name looked up here is a function that raises :class:`NotImplementedError` naming the op when called, so a
path that really needs a compiled kernel fails loudly instead of computing something else. Submodules
(``sgl_kernel.kvcacheio`` ...) do not exist: SGLang imports them inside ``try/except ImportError``.

Measured 2026-12-07 (AMD EPYC, AVX-512, no AMX): the tiny Qwen2 served through this module gave the same greedy
tokens as a real CPU kernel build. Installed by ``make install-sglang`` (tools/sglang_cpu); never used on GPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

__version__ = "0.0.0+cpu-shim"
IS_SHIM = True
"""Lets a check tell this module from a real sgl-kernel build."""


def _missing(name: str) -> Callable[..., NoReturn]:
    def op(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this sgl_kernel is the CPU shim from tools/sglang_cpu (no compiled "
            f"ops): the SGLang path that needs it cannot run here; use a real sglang-kernel build"
        )

    op.__name__ = op.__qualname__ = name
    return op


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
