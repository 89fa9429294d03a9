"""Metric curves from run directories (``metrics.jsonl`` / ``eval.jsonl``) as PNG files (matplotlib Agg)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from megatron_lpreg.telemetry import read_jsonl, read_metrics

logger = logging.getLogger(__name__)

DEFAULT_KEYS = ("reward/mean", "loss/policy", "entropy/mean", "response/length_mean", "lpreg/num_regularized",
                "actor/grad_norm", "heldout/greedy_acc", "heldout/sampled_acc")


def plot_runs(run_dirs: Sequence[str | Path], out_path: str | Path, keys: Sequence[str] = DEFAULT_KEYS,
              smooth: int = 1) -> Path:
    """One subplot per metric key, one line per run; keys no run has are left out.

    Args:
        run_dirs: run directories holding metrics.jsonl (and optionally eval.jsonl).
        out_path: PNG to write.
        keys: metric names to plot.
        smooth: moving-average window over steps (1 = raw).

    Raises:
        FileNotFoundError: a run directory has no metrics.jsonl.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
        runs[run_dir.name or str(run_dir)] = read_metrics(run_dir) + read_jsonl(run_dir / "eval.jsonl")
    present = [k for k in keys if any(k in row for rows in runs.values() for row in rows)]
    if not present:
        raise ValueError(f"none of the metrics {list(keys)} appear in {list(map(str, run_dirs))}")
    cols = min(3, len(present))
    rows_n = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for name, rows in runs.items():
            points = sorted((r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float)))
            if not points:
                continue
            steps, values = zip(*points)
            if smooth > 1 and len(values) >= smooth:
                values = [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
                          for i in range(len(values))]
            ax.plot(steps, values, label=name, marker="o" if len(steps) < 12 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
