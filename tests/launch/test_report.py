"""``megatron-lpreg collect``: summaries of run directories, eval scores, the joined table, Markdown/CSV, plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from megatron_lpreg import cli
from megatron_lpreg.launch.manifest import ArrayManifest, write_status
from megatron_lpreg.launch.report import build_table, collect, eval_score, summarize_run, to_markdown


def _metrics(run: Path, rows: list[dict], torn: bool = False) -> None:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 9, "lo' if torn else "")
    (run / "metrics.jsonl").write_text(text)


def _rows(n: int, rho: float) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "reward_mean": rho * s, "entropy": 2.0 - 0.25 * s} for s in range(1, n + 1)]


def test_summarize_run_final_values_and_tail_mean(tmp_path):
    _metrics(tmp_path / "r", _rows(6, 0.5), torn=True)
    summary = summarize_run(tmp_path / "r")
    assert summary.metrics == {"steps": 6, "loss": 1 / 6, "reward_mean": 3.0, "entropy": 0.5,
                               "reward_mean_last5": (1.0 + 1.5 + 2.0 + 2.5 + 3.0) / 5}
    assert summary.curves["entropy"][:2] == [(1, 1.75), (2, 1.5)]
    _metrics(tmp_path / "ns", [{"step": 1, "loss/policy": 0.3, "reward/mean": 0.25, "entropy/mean": 1.0}])
    assert summarize_run(tmp_path / "ns").metrics["reward_mean"] == 0.25  # namespaced keys are read too
    assert summarize_run(tmp_path / "missing").metrics["loss"] is None


@pytest.mark.parametrize("results", [
    {"math500": {"accuracy": 0.5, "mean_length": 300}},
    {"benchmarks": {"math500": {"avg@k": 0.5}}},
    {"results": [{"benchmark": "aime24", "accuracy": 0.1}, {"benchmark": "math500", "acc": 0.5}]},
    {"benchmark": "math500", "score": 0.5},
])
def test_eval_score_layouts(results):
    assert eval_score(results, "math500") == 0.5


def test_eval_score_missing():
    assert eval_score({"aime24": {"accuracy": 0.1}}, "math500") is None


def _sweep(root: Path) -> None:
    ArrayManifest(kind="train", command=["x"], tasks=[["algo.rho=0.005"], ["algo.rho=0.01"]],
                  task_args=["trainer.output_dir={task_dir}"]).write(root)
    _metrics(root / "task_0", _rows(3, 0.1))
    write_status(root, 0, {"exit_code": 0})
    _metrics(root / "task_1", _rows(2, 0.2))
    write_status(root, 1, {"exit_code": 1})


def _evals(root: Path, sweep: Path) -> None:
    tasks = [["--checkpoint", f"{sweep}/task_0@latest", "--benchmarks", b] for b in ("aime24", "math500")]
    ArrayManifest(kind="eval", command=["e"], tasks=tasks, task_args=["--out", "{task_dir}"]).write(root)
    ckpt = str(sweep / "task_0" / "checkpoints" / "step_0000003")
    for i, (bench, score) in enumerate((("aime24", 0.125), ("math500", 0.75))):
        (root / f"task_{i}").mkdir()
        (root / f"task_{i}" / "results.json").write_text(json.dumps({bench: {"accuracy": score}}))
        write_status(root, i, {"exit_code": 0, "argv": ["e", "--checkpoint", ckpt, "--benchmarks", bench]})


def test_table_joins_evals_to_their_runs(tmp_path):
    _sweep(tmp_path / "sw")
    _evals(tmp_path / "ev", tmp_path / "sw")
    columns, rows = build_table(*collect([tmp_path / "sw", tmp_path / "ev"]))
    assert columns == ["run", "algo.rho", "status", "steps", "loss", "reward_mean", "entropy", "reward_mean_last5",
                       "eval_step", "eval/aime24", "eval/math500"]
    assert [(r["run"], r["algo.rho"], r["status"], r["steps"], r.get("eval_step"), r.get("eval/math500"))
            for r in rows] == [("task_0", "0.005", "ok", 3, 3, 0.75),
                               ("task_1", "0.01", "failed (exit 1)", 2, None, None)]
    assert to_markdown(["a", "b"], [{"a": 0.123456, "b": "x|y"}, {"a": 2.0}]) == (
        "| a | b |\n|---|---|\n| 0.1235 | x\\|y |\n| 2 |  |\n")


def test_collect_cli_writes_table_csv_and_plots(tmp_path, capsys):
    _sweep(tmp_path / "sw")
    _evals(tmp_path / "ev", tmp_path / "sw")
    assert cli.main(["collect", str(tmp_path / "sw"), str(tmp_path / "ev"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| task_0 | 0.005 | ok | 3 |" in out
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["algo.rho"], r["reward_mean"], r["eval/aime24"]) for r in rows] == [
        ("task_0", "0.005", "0.3", "0.125"), ("task_1", "0.01", "0.4", "")]
    for name in ("curves.png", "eval.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["collect", str(tmp_path / "nothing")]) == 2
    assert "neither a sweep/eval array directory" in capsys.readouterr().err
