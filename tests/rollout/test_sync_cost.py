"""The colocated sync cost model (rollout/sync_cost.py): its bytes are the HF tensors the sync really moves (checked
against tiny checkpoints' safetensors, stage by stage), and the paper's Qwen2.5-32B numbers in docs/rollout.md."""
from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_lpreg.config import RunConfig
from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.models.qwen import model_config_from_hf
from megatron_lpreg.rollout.sync_cost import colocated_sync_cost, stage_bytes


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # untied with QKV bias / tied with q-k norms
def test_stage_bytes_are_the_hf_tensors_each_stage_exports(arch, request):
    path = request.getfixturevalue(f"tiny_{arch}")
    model = model_config_from_hf(path)
    sizes = {name: t.numel() * t.element_size() for name, t in hf_dir.iter_tensors(path)}
    assert stage_bytes(model, ParallelConfig()) == [sum(sizes.values())]
    last = model.num_layers - 1
    second = sum(b for n, b in sizes.items() if n.startswith(f"model.layers.{last}.") or n in (
        "model.norm.weight", "lm_head.weight"))
    assert stage_bytes(model, ParallelConfig(pp=2)) == [sum(sizes.values()) - second, second]


def test_qwen25_32b_on_the_paper_layout():
    cfg = RunConfig.load("configs/qwen2.5-32b_lpreg_64gpu.yaml", [])
    cost = colocated_sync_cost(cfg.model, cfg.parallel, 64, 8)
    assert cost.total_bytes == 2 * 32_763_876_352  # Qwen2.5-32B's parameters in bf16
    first, last = cost.stage_bytes
    # stage 0 = ranks 0-31 on nodes 0-3, stage 1 on nodes 4-7: every GPU gets the other stage over its NIC
    assert cost.internode_bytes == max(first, last) and cost.nvlink_bytes == max(first, last) * 7 // 8
    assert cost.seconds == pytest.approx(sum(s * 7 / 8 / 450e9 + s / 50e9 for s in (first, last)))
    assert re.search(r"modelled time per sync: 1\.44 s", "\n".join(cost.lines()))
    one_node = colocated_sync_cost(dataclasses.replace(cfg.model), ParallelConfig(tp=4, pp=2), 8, 8)
    assert one_node.internode_bytes == 0  # both stages on one node: the broadcast stays on NVLink
