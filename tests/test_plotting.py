"""Metric plots: dense per-step series may be smoothed, sparse ones (the held-out evals) are drawn as measured."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.plotting import plot_runs, plotted_series


def _write_run(run_dir, *, steps: int = 200, eval_every: int = 50):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(steps):
            f.write(json.dumps({"step": step, "reward/mean": float(step % 2)}) + "\n")
    evals = [(0, 0.225), (50, 0.30), (100, 0.28), (150, 0.395), (199, 0.410)]
    with open(run_dir / "eval.jsonl", "w") as f:
        for step, acc in evals:
            f.write(json.dumps({"step": step, "heldout/greedy_acc": acc}) + "\n")
    return evals


def test_sparse_eval_series_are_drawn_as_measured(tmp_path):
    """The demo plot used to end at greedy 0.325 (a 5-point moving average) while the demo printed 0.410."""
    evals = _write_run(tmp_path / "lpreg")
    series = plotted_series([tmp_path / "lpreg"], ["heldout/greedy_acc", "reward/mean"], smooth=5)
    steps, values = series["heldout/greedy_acc"]["lpreg"]
    assert list(zip(steps, values)) == evals
    # the dense per-step series is smoothed over the last 5 steps: 0,1,0,1,0 -> 0.4 (or 0.6)
    _, reward = series["reward/mean"]["lpreg"]
    assert reward[0] == 0.0 and reward[1] == 0.5 and reward[-1] == pytest.approx(0.6)


def test_smoothing_window_counts_steps_not_points(tmp_path):
    """A dense series with a gap (a resumed run that lost steps) is not averaged across the gap."""
    run = tmp_path / "gap"
    run.mkdir()
    rows = [{"step": s, "reward/mean": 0.0} for s in range(10)] + [{"step": s, "reward/mean": 1.0} for s in (30, 31)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, values = plotted_series([run], ["reward/mean"], smooth=5)["reward/mean"]["gap"]
    assert values[-2:] == [1.0, 1.0]


def test_plot_runs_writes_a_png(tmp_path):
    _write_run(tmp_path / "lpreg")
    out = plot_runs([tmp_path / "lpreg"], tmp_path / "plot.png", smooth=5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
