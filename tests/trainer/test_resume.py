"""End to end through the train CLI: a run of 4 steps equals a run of 2 steps + resume + 2 steps, bit for bit
(metrics.jsonl losses and rewards, and the final parameters), and resuming a run dir with a different model is
refused with a clear error."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from megatron_lpreg.cli import main as cli_main
from megatron_lpreg.models.convert import convert_mcore_to_hf

pytestmark = pytest.mark.slow

SMALL = ["rollout.prompts_per_step=8", "rollout.n=4", "eval.benchmarks=[]", "checkpoint.interval=2",
         "reward.name=tests.support.rewards:even_length",
         "trainer.world_size=2", "parallel.tp=2"]


def _train(out, steps, *extra):
    code = cli_main(["train", "configs/tiny_cpu.yaml", f"trainer.max_steps={steps}",
                     f"trainer.output_dir={out}", *SMALL, *extra])
    assert code == 0


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir, tmp_path, name):
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out = convert_mcore_to_hf(ckpt, tmp_path / name)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_two_plus_two_steps_equal_four(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 4)
    _train(resumed, 2)
    assert [r["step"] for r in _rows(resumed)] == [0, 1]
    _train(resumed, 4)  # trainer.resume=auto picks up checkpoints/latest (step 2)
    a, b = _rows(straight), _rows(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("perf/"):
                assert ra[key] == rb[key], (ra["step"], key)
    assert any(r["loss/policy"] != 0 for r in a), "the test needs steps with a real update"
    assert all({"step", "loss", "reward_mean", "entropy"} <= r.keys() for r in a)
    wa, wb = _final_weights(straight, tmp_path, "hf_a"), _final_weights(resumed, tmp_path, "hf_b")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), name


def test_resuming_with_a_different_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 1)
    code = cli_main(["train", "configs/tiny_cpu.yaml", "trainer.max_steps=2", f"trainer.output_dir={run}",
                     *SMALL, "model.hidden_size=64", "model.ffn_hidden_size=128", "model.head_dim=16"])
    assert code == 2
    assert "different model" in capsys.readouterr().err


def test_resume_at_another_tensor_parallel_size(tmp_path):
    """A TP2 checkpoint (model + optimizer) reshards on load into a TP1 run, which carries on from step 2."""
    run = tmp_path / "run"
    _train(run, 2)
    code = cli_main(["train", "configs/tiny_cpu.yaml", "trainer.max_steps=3", f"trainer.output_dir={run}",
                     *SMALL, "parallel.tp=1", "trainer.world_size=1"])
    assert code == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["actor/skipped"] == 0.0 and rows[2]["actor/grad_norm"] > 0


def test_dp2_distributed_optimizer_resume_with_dp_reshardable_checkpoints(tmp_path):
    """checkpoint.optimizer_format=dp_reshardable reaches the save (megatron records it in the checkpoint), and a
    DP2 run with the distributed optimizer resumed from it reproduces the uninterrupted run's metrics."""
    from megatron_lpreg.models.checkpoint import _saved_optimizer_format

    dp2 = ["parallel.tp=1", "parallel.use_distributed_optimizer=true", "checkpoint.optimizer_format=dp_reshardable"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 3, *dp2)
    _train(resumed, 2, *dp2)
    ckpt = resumed / "checkpoints" / (resumed / "checkpoints" / "latest").read_text().strip()
    assert _saved_optimizer_format(ckpt) == "dp_reshardable"
    _train(resumed, 3, *dp2)
    a, b = _rows(straight), _rows(resumed)
    assert [r["step"] for r in b] == [0, 1, 2] and b[2]["actor/grad_norm"] > 0
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("perf/"):
                assert ra[key] == rb[key], (ra["step"], key)
