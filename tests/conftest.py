"""Shared pytest setup: quiet, offline, deterministic; heavy imports done once in the parent so that forked
ranks start fast (see megatron_lpreg/parallel/spawn.py)."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Heavy imports once, here, so every forked rank starts with them loaded.
import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401

from megatron_lpreg.parallel.spawn import start_zygote  # noqa: E402

# The tiny-model session fixtures (tiny_qwen2, tiny_qwen3, tiny_vllm_qwen2) for every test: a test names them as
# arguments, without importing them (an import would shadow the fixture name, ruff F811).
pytest_plugins = ("tests.support.tiny",)

# Ranks are forked from a helper made now, before this process runs any (multi-threaded) torch op: GNU OpenMP
# does not survive fork, and a rank forked from a process that already used its thread pool hangs.
start_zygote()
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
