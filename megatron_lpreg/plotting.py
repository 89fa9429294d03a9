"""Metric curves from run directories (``metrics.jsonl`` / ``eval.jsonl``) as PNG files (matplotlib Agg)."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from megatron_lpreg.rundir import EVAL_FILE, METRICS_FILE
from megatron_lpreg.telemetry import read_jsonl, read_metrics

logger = logging.getLogger(__name__)

DEFAULT_KEYS = ("reward/mean", "loss/policy", "entropy/mean", "response/length_mean", "lpreg/num_regularized",
                "actor/grad_norm", "heldout/greedy_acc", "heldout/sampled_acc")


Series = tuple[list[int], list[float]]
"""(steps, values) of one metric of one run, as drawn."""


def moving_average(steps: Sequence[int], values: Sequence[float], window: int) -> list[float]:
    """Mean of the values measured within the last ``window`` steps (``step - window < s <= step``) at each point.

    The window counts steps, not points, so a sparse series (held-out evals every 50 steps) is drawn as measured
    and a dense series is never averaged across a gap.
    """
    out, lo = [], 0
    for hi, step in enumerate(steps):
        while steps[lo] <= step - window:
            lo += 1
        out.append(math.fsum(values[lo:hi + 1]) / (hi - lo + 1))  # a lone point is returned exactly
    return out


def plotted_series(run_dirs: Sequence[str | Path], keys: Sequence[str],
                   smooth: int = 1) -> dict[str, dict[str, Series]]:
    """The curves :func:`plot_runs` draws: ``{key: {run: (steps, values)}}``; keys and runs without data left out.

    Args:
        run_dirs: run directories holding metrics.jsonl (and optionally eval.jsonl).
        keys: metric names.
        smooth: moving-average window in steps (1 = raw; see :func:`moving_average`).

    Raises:
        FileNotFoundError: a run directory has no metrics.jsonl.
    """
    runs = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / METRICS_FILE).exists():
            raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
        runs[run_dir.name or str(run_dir)] = read_metrics(run_dir) + read_jsonl(run_dir / EVAL_FILE)
    series: dict[str, dict[str, Series]] = {}
    for key in keys:
        for name, rows in runs.items():
            points = sorted((r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float)))
            if not points:
                continue
            steps, values = (list(column) for column in zip(*points))
            if smooth > 1:
                values = moving_average(steps, values, smooth)
            series.setdefault(key, {})[name] = (steps, values)
    return series


def plot_runs(run_dirs: Sequence[str | Path], out_path: str | Path, keys: Sequence[str] = DEFAULT_KEYS,
              smooth: int = 1) -> Path:
    """One subplot per metric key, one line per run; keys no run has are left out.

    Args:
        run_dirs: run directories holding metrics.jsonl (and optionally eval.jsonl).
        out_path: PNG to write.
        keys: metric names to plot.
        smooth: moving-average window in steps (1 = raw); sparse series such as the evals are drawn as measured.

    Raises:
        FileNotFoundError: a run directory has no metrics.jsonl.
        ValueError: none of ``keys`` has data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plotted_series(run_dirs, keys, smooth)
    present = [k for k in keys if k in series]
    if not present:
        raise ValueError(f"none of the metrics {list(keys)} appear in {list(map(str, run_dirs))}")
    cols = min(3, len(present))
    rows_n = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for name, (steps, values) in series[key].items():
            ax.plot(steps, values, label=name, marker="o" if len(steps) < 12 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if smooth > 1:
        fig.suptitle(f"moving average over {smooth} steps (evaluations drawn as measured)", fontsize=9)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
