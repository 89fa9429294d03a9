"""`megatron-lpreg eval` end to end on CPU: a tiny offline Qwen2, the real local engine from the rollout factory,
the synthetic held-out problems and the fixture files."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_lpreg.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"


def test_eval_cli_with_local_engine(tiny_qwen2, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "--model", str(tiny_qwen2), "--benchmarks", "synthetic,aime24", "--data-dir", str(FIXTURES),
                 "--samples", "2", "--out", str(out), "eval.max_new_tokens=4", "data.heldout_size=3",
                 "data.dev_size=0", "reward.num_workers=1", "seed=5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| synthetic | greedy | 3 | 1 |" in printed and "| aime24 | sampled | 3 | 2 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seed"] == 5 and results["benchmarks"]["aime24"]["k"] == 2
    rows = [json.loads(x) for x in (out / "generations" / "aime24.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0 < r["response_tokens"] <= 4 for r in rows)


def test_eval_cli_reports_bad_input(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path), "--benchmarks", "synthetic", "eval.samples=0"])
    assert code == 2 and "eval.samples=0" in capsys.readouterr().out
    code = main(["eval", "--checkpoint", str(tmp_path / "missing"), "--benchmarks", "synthetic"])
    assert code == 2 and "checkpoint directory not found" in capsys.readouterr().out
