"""A run whose loss is never finite skips updates and then stops with a clear error (exit code 1)."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "configs/tiny_cpu.yaml", "trainer.max_steps=10", f"trainer.output_dir={out}",
                     "rollout.prompts_per_step=4", "rollout.n=2", "eval.benchmarks=[]",
                     "trainer.max_consecutive_nan=2", "reward.name=tests.support.rewards:nan_reward"])
    assert code == 1
    err = capsys.readouterr().err
    assert "NonFiniteLossError" in err and "2 time(s) in a row" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["actor/skipped"] for r in rows] == [1.0, 1.0]
