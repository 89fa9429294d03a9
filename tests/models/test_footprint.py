"""Parameter count and checkpoint bytes: the count against real tiny HF checkpoints of both families, the bytes
formula against the paper configs (the ~460 GB per Qwen2.5-32B checkpoint of issue 19). The tensors a real
training checkpoint holds are checked against :func:`checkpoint_size` in tests/trainer/test_preemption.py."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from megatron_lpreg.config import RunConfig
from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.config.trainer import CheckpointConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.models.footprint import checkpoint_size, human_bytes, parameter_count
from megatron_lpreg.models.qwen import model_config_from_hf
from tests.support.tiny import tiny_model_dir


def _hf_numel(path) -> int:
    total = 0
    for file in hf_dir.safetensors_files(path):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                total += _prod(handle.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


@pytest.mark.parametrize("arch, kwargs", [
    ("qwen2", dict(vocab_size=1024)),                                  # QKV bias, untied
    ("qwen2", dict(vocab_size=1024, tie_word_embeddings=True)),
    ("qwen3", dict(vocab_size=1024, head_dim=32)),                     # q/k norms, no bias, tied
    ("qwen3", dict(vocab_size=1024, tie_word_embeddings=False, num_layers=3)),
])
def test_parameter_count_equals_the_tensors_of_a_real_checkpoint(arch, kwargs):
    path = tiny_model_dir(arch, **kwargs)
    cfg = model_config_from_hf(path)  # vocab 1024 = 8 x 128: no padding at TP1, so HF and megatron agree
    assert parameter_count(cfg, tp=1) == _hf_numel(path)


def test_padding_for_tp_adds_embedding_rows():
    cfg = model_config_from_hf(tiny_model_dir("qwen2", vocab_size=1000))
    assert parameter_count(cfg, tp=1) - _hf_numel(tiny_model_dir("qwen2", vocab_size=1000)) == 24 * 64 * 2
    assert parameter_count(cfg, tp=4) == parameter_count(cfg, tp=1)  # 1000 -> 1024 at 128 x 1 and at 128 x 4
    assert parameter_count(cfg, tp=16) == parameter_count(cfg, tp=1) + (2048 - 1024) * 64 * 2


def test_paper_checkpoints_are_about_460_and_207_gb():
    big = RunConfig.load("configs/qwen2.5-32b_lpreg_64gpu.yaml")
    size = checkpoint_size(big.model, big.parallel, big.checkpoint)
    assert size.parameters == 32_769_119_232  # Qwen2.5-32B: 32.76e9 + 2 x 512 x 5120 vocab padding at TP8
    assert size.total == 14 * size.parameters and human_bytes(size.total) == "458.8 GB"
    small = RunConfig.load("configs/qwen3-14b_lpreg_64gpu.yaml")
    assert human_bytes(checkpoint_size(small.model, small.parallel, small.checkpoint).total) == "206.8 GB"


def test_bytes_per_parameter_by_dtype_optimizer_and_sharding():
    model = RunConfig.load("configs/tiny_cpu.yaml").model
    n = parameter_count(model, 1)
    plain, dist = ParallelConfig(), ParallelConfig(use_distributed_optimizer=True)
    assert checkpoint_size(model, plain, CheckpointConfig()).total == 12 * n  # fp32: weights + 2 Adam moments
    assert checkpoint_size(model, dist, CheckpointConfig()).total == 16 * n  # + fp32 "param" of the dist optim
    assert checkpoint_size(model, plain, CheckpointConfig(save_optimizer=False)).total == 4 * n
    model.params_dtype = "bfloat16"
    assert checkpoint_size(model, plain, CheckpointConfig()).total == 14 * n  # bf16 + fp32 main + moments
    assert "checkpoint bytes=" in checkpoint_size(model, plain, CheckpointConfig()).line()
