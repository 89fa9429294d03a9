"""The eval layout: one node per eval task, its own engine TP and count (eval.engine_tp, eval.num_engines), checked
by ``megatron-lpreg plan`` (``--eval`` prints it) and used by ``megatron-lpreg eval`` to build its engine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.config import RunConfig
from megatron_lpreg.config.data import EvalConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.eval.layout import EvalLayoutError, eval_rollout_config, plan_eval_layout, visible_gpus

ROOT = Path(__file__).resolve().parents[2]
PAPER_32B = "configs/qwen2.5-32b_lpreg_64gpu.yaml"


def _sglang(**kw) -> RolloutConfig:
    return RolloutConfig(**{"engine": "sglang", "engine_tp": 4, "num_engines": 16, **kw})


def test_the_training_engine_count_no_longer_leaks_into_eval():
    """The 32B run's 16 TP4 engines span 8 nodes; its eval task gets what fits one node (engine k on k*tp..)."""
    layout = plan_eval_layout(EvalConfig(), _sglang(), gpus_per_node=8)
    assert (layout.engine_tp, layout.num_engines, layout.gpus_used) == (4, 2, 8)
    assert layout.lines() == ["role=eval engine id=0 node=0 gpus=0,1,2,3", "role=eval engine id=1 node=0 gpus=4,5,6,7"]
    rollout = eval_rollout_config(_sglang(), layout)
    assert (rollout.engine_tp, rollout.num_engines) == (4, 2)
    layout = plan_eval_layout(EvalConfig(engine_tp=2, num_engines=3), _sglang(), gpus_per_node=8)
    assert (layout.engine_tp, layout.num_engines, layout.gpus_used) == (2, 3, 6)
    assert plan_eval_layout(EvalConfig(engine_tp=8), _sglang(), gpus_per_node=8).num_engines == 1


@pytest.mark.parametrize("eval_kw, rollout_kw, gpn, words", [
    (dict(num_engines=16), {}, 8, ["eval.num_engines=16", "eval.engine_tp=0 (= rollout.engine_tp=4)", "64 GPUs",
                                   "eval.num_engines<=2"]),
    (dict(engine_tp=16), {}, 8, ["eval.engine_tp=16", "eval.engine_tp<=8"]),
    (dict(engine_tp=2, num_engines=5), {}, 8, ["eval.num_engines=5", "eval.engine_tp=2", "10 GPUs"]),
    ({}, {}, 0, ["needs GPUs", "rollout.engine=local"]),
    (dict(num_engines=2), dict(engine="vllm"), 8, ["eval.num_engines=2", "vllm"]),
])
def test_layouts_that_do_not_fit_one_node_are_refused(eval_kw, rollout_kw, gpn, words):
    with pytest.raises(EvalLayoutError) as info:
        plan_eval_layout(EvalConfig(**eval_kw), _sglang(**rollout_kw), gpus_per_node=gpn)
    for word in words:
        assert word in str(info.value)


def test_local_and_attached_engines_place_nothing():
    local = plan_eval_layout(EvalConfig(num_engines=99), RolloutConfig(), gpus_per_node=0)
    assert local.lines() == [] and eval_rollout_config(RolloutConfig(), local) == RolloutConfig()
    urls = ["http://a:1", "http://b:2"]
    attached = plan_eval_layout(EvalConfig(), _sglang(sglang_urls=urls, num_engines=2), gpus_per_node=8)
    assert attached.attached and attached.lines() == [] and attached.num_engines == 2


def test_negative_eval_layout_keys_are_config_errors():
    with pytest.raises(Exception, match=r"eval.num_engines=-1 must be >= 0 \(0 = fill the node\)"):
        RunConfig.from_dict({"eval": {"num_engines": -1}})


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_gpus() == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lpreg", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_shows_and_checks_the_eval_layout():
    out = _plan(PAPER_32B, "--nodes", "8", "--gpus-per-node", "8", "--eval")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["role=eval engine id=0 node=0 gpus=0,1,2,3",
                                       "role=eval engine id=1 node=0 gpus=4,5,6,7"]
    assert "eval: 1 node, 2 sglang engine(s) x TP4 = 8 of 8 GPUs" in out.stderr
    out = _plan(PAPER_32B, "eval.num_engines=16", "--nodes", "8", "--gpus-per-node", "8")  # the training plan too
    assert out.returncode == 2 and out.stdout == ""
    assert "eval.num_engines=16" in out.stderr and "eval.num_engines<=2" in out.stderr
    out = _plan(PAPER_32B, "--nodes", "8", "--gpus-per-node", "4", "--eval")  # 4-GPU nodes: 2 x TP4 do not fit
    assert out.returncode == 2 and "eval.num_engines=2 x eval.engine_tp=4 needs 8 GPUs" in out.stderr
