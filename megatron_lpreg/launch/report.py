"""One comparison table (Markdown + CSV) and plots from sweep / eval-array directories or plain run directories.

Training runs contribute their overrides and final metrics (``metrics.jsonl``: step, loss, reward_mean, entropy;
the namespaced names ``loss/policy``, ``reward/mean``, ``entropy/mean`` are read too); eval tasks contribute one
score per benchmark (``results.json`` in the task directory), joined to the run their checkpoint came from.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lpreg.config.base import parse_override
from megatron_lpreg.launch.manifest import ArrayManifest, read_status
from megatron_lpreg.rundir import LATEST_SUFFIX, METRICS_FILE, checkpoint_step
from megatron_lpreg.telemetry import read_jsonl

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "loss/policy"),
    "reward_mean": ("reward_mean", "reward/mean"),
    "entropy": ("entropy", "entropy/mean"),
}
"""Table column -> metrics.jsonl keys tried in order."""
LAST_K = 5
"""``reward_mean_last5``: mean over the last LAST_K logged steps (less noisy than the final step)."""
SCORE_KEYS = ("accuracy", "acc", "avg@k", "mean@k", "score", "pass@1")
"""Eval result fields taken as a benchmark's headline score, in order of preference."""


@dataclass(kw_only=True)
class RunSummary:
    """One training run: identity, overrides, outcome, final metrics and curves."""

    run: str
    run_dir: str
    overrides: dict[str, str] = field(default_factory=dict)
    status: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass(kw_only=True)
class EvalRecord:
    """One eval task: which run and checkpoint, which benchmark, its headline score."""

    run_dir: str
    step: int | None
    benchmark: str
    score: float | None
    status: str


def _metric(row: dict[str, Any], keys: Iterable[str]) -> float | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def summarize_run(run_dir: str | os.PathLike, *, name: str = "", overrides: dict[str, str] | None = None,
                  status: str = "") -> RunSummary:
    """Final metrics and curves of one run directory (an unfinished or missing metrics.jsonl gives blanks)."""
    rows = read_jsonl(Path(run_dir) / METRICS_FILE)
    curves: dict[str, list[tuple[int, float]]] = {column: [] for column in METRIC_KEYS}
    for index, row in enumerate(rows):
        step = int(row.get("step", index))
        for column, keys in METRIC_KEYS.items():
            value = _metric(row, keys)
            if value is not None:
                curves[column].append((step, value))
    metrics: dict[str, float | None] = {"steps": float(len(rows)) if rows else None}  # steps logged
    for column in METRIC_KEYS:
        metrics[column] = curves[column][-1][1] if curves[column] else None
    tail = [v for _, v in curves["reward_mean"][-LAST_K:]]
    metrics[f"reward_mean_last{LAST_K}"] = sum(tail) / len(tail) if tail else None
    return RunSummary(run=name or Path(run_dir).name, run_dir=str(Path(run_dir).resolve()),
                      overrides=overrides or {}, status=status, metrics=metrics, curves=curves)


def _status_text(root: Path, index: int) -> str:
    status = read_status(root, index)
    if status is None:
        return "not finished"
    return "ok" if status.get("exit_code") == 0 else f"failed (exit {status.get('exit_code')})"


def collect_train_array(root: str | os.PathLike) -> list[RunSummary]:
    """A summary per sweep task, with its manifest overrides as columns."""
    root = Path(root).resolve()
    manifest = ArrayManifest.read(root)
    out = []
    for index, task in enumerate(manifest.tasks):
        overrides = dict(parse_override(text) for text in task)
        shown = {key: text.split("=", 1)[1] for key, text in zip(overrides, task)}
        out.append(summarize_run(manifest.task_dir(root, index), name=f"task_{index}", overrides=shown,
                                 status=_status_text(root, index)))
    return out


def eval_score(results: Any, benchmark: str) -> float | None:
    """The headline score of ``benchmark`` in an eval ``results.json`` (several layouts accepted).

    Looks for the benchmark under the top level, ``benchmarks`` or ``results`` (mapping, or a list of records
    with a ``benchmark``/``name`` field), then takes the first of :data:`SCORE_KEYS` present.
    """
    record: Any = None
    for container in (results, *(results.get(k) for k in ("benchmarks", "results") if isinstance(results, dict))):
        if isinstance(container, dict) and isinstance(container.get(benchmark), dict):
            record = container[benchmark]
        elif isinstance(container, list):
            record = next((r for r in container if isinstance(r, dict)
                           and benchmark in (r.get("benchmark"), r.get("name"))), None)
        if record is not None:
            break
    if record is None and isinstance(results, dict) and results.get("benchmark") == benchmark:
        record = results
    if not isinstance(record, dict):
        return None
    return _metric(record, SCORE_KEYS)


def collect_eval_array(root: str | os.PathLike) -> list[EvalRecord]:
    """An :class:`EvalRecord` per eval task; the checkpoint actually evaluated comes from the task's status."""
    root = Path(root).resolve()
    manifest = ArrayManifest.read(root)
    records = []
    for index, task in enumerate(manifest.tasks):
        args = dict(zip(task[::2], task[1::2]))
        spec, bench = args.get("--checkpoint", ""), args.get("--benchmarks", "")
        status = read_status(root, index) or {}
        argv = status.get("argv") or []
        resolved = argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else spec
        run_dir = spec[: -len(LATEST_SUFFIX)] if spec.endswith(LATEST_SUFFIX) else str(Path(spec).parent.parent)
        results_path = manifest.task_dir(root, index) / "results.json"
        score = eval_score(json.loads(results_path.read_text()), bench) if results_path.is_file() else None
        records.append(EvalRecord(run_dir=str(Path(run_dir).resolve()), step=checkpoint_step(resolved),
                                  benchmark=bench, score=score, status=_status_text(root, index)))
    return records


def collect(dirs: Iterable[str | os.PathLike]) -> tuple[list[RunSummary], list[EvalRecord]]:
    """Read sweep/eval array directories and plain run directories (anything with metrics.jsonl).

    Raises:
        ValueError: a directory is neither an array directory nor a run directory.
    """
    runs: list[RunSummary] = []
    evals: list[EvalRecord] = []
    for item in dirs:
        path = Path(item)
        if (path / "array.json").is_file():
            kind = json.loads((path / "array.json").read_text())["kind"]
            if kind == "train":
                runs.extend(collect_train_array(path))
            else:
                evals.extend(collect_eval_array(path))
        elif (path / METRICS_FILE).is_file():
            runs.append(summarize_run(path))
        else:
            raise ValueError(f"{path}: neither a sweep/eval array directory (array.json) nor a run (metrics.jsonl)")
    return runs, evals


def build_table(runs: list[RunSummary], evals: list[EvalRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: one row per run and evaluated checkpoint step (one row per run without evals)."""
    override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    metric_keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
    benchmarks = list(dict.fromkeys(e.benchmark for e in evals))
    by_run: dict[str, dict[int | None, dict[str, Any]]] = {}
    for record in evals:
        cell = by_run.setdefault(record.run_dir, {}).setdefault(record.step, {})
        cell[f"eval/{record.benchmark}"] = record.score
    known = {r.run_dir: r for r in runs}
    for run_dir in by_run:
        if run_dir not in known:  # evaluated run that was not collected itself
            known[run_dir] = RunSummary(run=Path(run_dir).name, run_dir=run_dir)
    columns = ["run", *override_keys, "status", *metric_keys, *(["eval_step"] if evals else []),
               *(f"eval/{b}" for b in benchmarks)]
    rows = []
    for summary in known.values():
        base = {"run": summary.run, **summary.overrides, "status": summary.status, **summary.metrics}
        for step, scores in sorted(by_run.get(summary.run_dir, {None: {}}).items(), key=lambda kv: kv[0] or -1):
            rows.append({**base, **({"eval_step": step} if evals else {}), **scores})
    return columns, rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e9 else f"{value:.4g}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: _cell(row.get(c)) for c in columns} for row in rows)


def plot(runs: list[RunSummary], evals: list[EvalRecord], out_dir: str | os.PathLike) -> list[Path]:
    """``curves.png`` (reward_mean, loss, entropy vs step, one line per run) and ``eval.png`` (score per
    benchmark and run, latest evaluated step); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out_dir = Path(out_dir)
    if any(r.curves.get(c) for r in runs for c in METRIC_KEYS):
        fig, axes = plt.subplots(1, len(METRIC_KEYS), figsize=(5 * len(METRIC_KEYS), 3.6))
        for ax, column in zip(axes, METRIC_KEYS):
            for summary in runs:
                points = summary.curves.get(column) or []
                if points:
                    label = " ".join(f"{k}={v}" for k, v in summary.overrides.items()) or summary.run
                    ax.plot([s for s, _ in points], [v for _, v in points], label=label, marker=".")
            ax.set_title(column)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "curves.png")
    scored = [e for e in evals if e.score is not None]
    if scored:
        latest: dict[tuple[str, str], EvalRecord] = {}
        for record in scored:
            key = (record.run_dir, record.benchmark)
            if key not in latest or (record.step or -1) >= (latest[key].step or -1):
                latest[key] = record
        run_dirs = list(dict.fromkeys(k[0] for k in latest))
        benches = list(dict.fromkeys(k[1] for k in latest))
        width = 0.8 / len(run_dirs)
        fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(benches) + 2), 3.6))
        for i, run_dir in enumerate(run_dirs):
            values = [latest[(run_dir, b)].score if (run_dir, b) in latest else 0.0 for b in benches]
            ax.bar([j + i * width for j in range(len(benches))], values, width, label=Path(run_dir).name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches)
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "eval.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "eval.png")
    return written


def write_report(dirs: list[str], out_dir: str | os.PathLike) -> tuple[str, list[Path]]:
    """Collect ``dirs`` and write ``summary.md``, ``summary.csv`` and the plots into ``out_dir``.

    Returns:
        The Markdown table and the paths written.

    Raises:
        ValueError: nothing to collect, or see :func:`collect`.
    """
    runs, evals = collect(dirs)
    if not runs and not evals:
        raise ValueError(f"nothing to collect in {', '.join(map(str, dirs))}")
    columns, rows = build_table(runs, evals)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = to_markdown(columns, rows)
    sources = " ".join(shlex.quote(str(Path(d).resolve())) for d in dirs)
    (out_dir / "summary.md").write_text(f"# megatron-lpreg collect {sources}\n\n{table}")
    write_csv(out_dir / "summary.csv", columns, rows)
    return table, [out_dir / "summary.md", out_dir / "summary.csv", *plot(runs, evals, out_dir)]
