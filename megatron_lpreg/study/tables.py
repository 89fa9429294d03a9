"""Plain tables and per-step curves shared by the study's reports (``study report``, ``study rerun``, the Task A
arms): no study logic here, so that report.py and arms.py can both use it."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV as dicts of strings."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """Write ``rows`` as CSV (header: every key, in first-seen order; a row without a key leaves it empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: str, digits: int = 3) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.{digits}g}" if abs(number) >= 1e-3 or number == 0 else f"{number:.2e}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` (numbers to 3 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(str(row[c])) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


CURVES = (("entropy_all", "entropy, all tokens"), ("entropy_decision", "entropy, decision token"),
          ("reward", "rollout accuracy"), ("spark_freq", "spark frequency"),
          ("lpreg/num_regularized", "regularised tokens per step"))
"""Per-step columns of ``<arm>_metrics.csv`` plotted by :func:`plot_curves` (title of each panel)."""


def plot_curves(runs: dict[str, Sequence[Path]], out: Path) -> Path:
    """One panel per :data:`CURVES` column: for each arm, the mean over its seed CSVs and the min-max range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.5))
    for index, (arm, paths) in enumerate(runs.items()):
        color = f"C{index}"  # one colour per arm in every panel, also where an arm has no such column
        tables = [read_csv(p) for p in paths if p.exists()]
        for ax, (key, title) in zip(axes, CURVES):
            series = [[float(row[key]) for row in table if row.get(key, "") != ""] for table in tables]
            series = [s for s in series if s]
            if not series:
                continue
            width = min(map(len, series))
            columns = list(zip(*(s[:width] for s in series)))
            mean = [sum(c) / len(c) for c in columns]
            ax.plot(range(width), mean, label=f"{arm} ({len(series)} seeds)", color=color)
            ax.fill_between(range(width), [min(c) for c in columns], [max(c) for c in columns], alpha=0.2,
                            color=color)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
