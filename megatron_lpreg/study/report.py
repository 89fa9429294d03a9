"""docs/study.md's tables and plots, regenerated from the committed CSVs (``megatron-lpreg study report``).

The CSVs live in ``docs/study/`` (:data:`RESULTS_DIR`); the tables replace the text between
``<!-- study-report:NAME:begin -->`` and ``<!-- study-report:NAME:end -->`` in docs/study.md, so the hand-written
protocol around them never changes. A CSV that does not exist yet leaves its block saying "not run yet".
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_lpreg.study.tables import markdown_table, read_csv

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "docs" / "study"
STUDY_DOC = REPO / "docs" / "study.md"


def stage0_table(results: Path) -> str:
    """The Stage 0 effect table (``stage0_effects.csv``)."""
    rows = read_csv(results / "stage0_effects.csv")
    columns = ["arm", "tail_mass", "rho", "off_policy", "seeds", "survival_ratio", "survival_ratio_min",
               "survival_ratio_max", "hard_acc_diff", "hard_acc_diff_min", "hard_acc_diff_max", "spark_selected_frac"]
    return markdown_table(rows, columns) + "\n\n![Stage 0](study/stage0.png)"


def plot_stage0(effects: Sequence[dict], out: Path, *, centre_tail: float = 0.2, centre_rho: float = 0.2) -> Path:
    """Three panels: spark-survival ratio vs GRPO against tail mass, against rho, and on- vs off-policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pick(**match) -> list[dict]:
        return [r for r in effects if all(str(r[k]) == str(v) for k, v in match.items())]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm in ("lpreg", "lpreg_global"):
        for ax, key, rows in ((axes[0], "tail_mass", pick(arm=arm, rho=centre_rho, off_policy=False)),
                              (axes[1], "rho", pick(arm=arm, tail_mass=centre_tail, off_policy=False))):
            rows = sorted(rows, key=lambda r: float(r[key]))
            if not rows:
                continue
            x = [float(r[key]) for r in rows]
            mid = [float(r["survival_ratio"]) for r in rows]
            low = [m - float(r["survival_ratio_min"]) for m, r in zip(mid, rows)]
            high = [float(r["survival_ratio_max"]) - m for m, r in zip(mid, rows)]
            ax.errorbar(x, mid, yerr=[low, high], marker="o", capsize=3, label=arm)
            ax.set_xscale("log")
            ax.set_xlabel(key)
    names, on, off = [], [], []
    for arm in sorted({r["arm"] for r in pick(tail_mass=centre_tail, off_policy=True)}):
        rows_on = [r for r in pick(arm=arm, tail_mass=centre_tail, off_policy=False)
                   if not arm.startswith("lpreg") or float(r["rho"]) == centre_rho]
        rows_off = [r for r in pick(arm=arm, tail_mass=centre_tail, off_policy=True)
                    if not arm.startswith("lpreg") or float(r["rho"]) == centre_rho]
        if rows_on and rows_off:
            names.append(arm)
            on.append(float(rows_on[0]["survival_ratio"]))
            off.append(float(rows_off[0]["survival_ratio"]))
    xs = range(len(names))
    axes[2].bar([x - 0.2 for x in xs], on, width=0.4, label="on-policy")
    axes[2].bar([x + 0.2 for x in xs], off, width=0.4, label="off-policy (4 updates)")
    axes[2].set_xticks(list(xs), names, rotation=20)
    titles = (f"vs tail mass (rho {centre_rho:g}, on-policy)", f"vs rho (tail {centre_tail:g}, on-policy)",
              f"on vs off-policy (tail {centre_tail:g}, rho {centre_rho:g})")
    for ax, title in zip(axes, titles):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("spark survival / GRPO's (geo. mean, min-max)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def g1_table(results: Path) -> str:
    """Gate G1, one row per warm-start attempt (``g1.csv``)."""
    rows = [{**row, "protocol": row.get("protocol") or "True"} for row in read_csv(results / "g1.csv")]
    columns = ["attempt", "protocol", "seed", "steps", "seconds", "p_spark", "noise_max_rel", "mass_below_cut",
               "direct_easy", "direct_hard", "spark_easy", "spark_hard", "passed"]
    failed = [", ".join(k[3:] for k, v in row.items() if k.startswith("ok_") and v == "False") for row in rows]
    notes = "\n".join(f"- attempt {row['attempt']}: " + (f"failed {f}" if f else "passed G1's thresholds")
                      + ("" if row["protocol"] == "True" else " (exploratory: outside the protocol's 3 attempts)")
                      for row, f in zip(rows, failed))
    return markdown_table(rows, columns) + ("\n\n" + notes if notes else "")


def _task_a_arms(results: Path) -> str:
    from megatron_lpreg.study.arms import render

    return render(results)


def _task_a_mechanism(results: Path) -> str:
    from megatron_lpreg.study.arms import render_mechanism

    return render_mechanism(results)


SECTIONS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "stage0": ("stage0_effects.csv", stage0_table),
    "g1": ("g1.csv", g1_table),
    "task_a": ("task_a/runs.csv", _task_a_arms),
    "task_a_mechanism": ("task_a_mechanism/runs.csv", _task_a_mechanism),
}
"""Report block name -> (the CSV it needs, the function that renders it)."""


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` replaced by ``body``.

    Raises:
        ValueError: the doc has no such block.
    """
    pattern = re.compile(rf"(<!-- study-report:{name}:begin -->\n).*?(<!-- study-report:{name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"docs/study.md has no block '<!-- study-report:{name}:begin -->' ... ':end -->'")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def regenerate(results: Path = RESULTS_DIR, doc: Path = STUDY_DOC) -> list[str]:
    """Re-render every report block of ``doc`` (and the plots) from the CSVs in ``results``; returns what was done."""
    text = doc.read_text()
    done = []
    for name, (csv_name, render) in SECTIONS.items():
        if f"<!-- study-report:{name}:begin -->" not in text:
            continue
        if (results / csv_name).exists():
            text = replace_block(text, name, render(results))
            done.append(f"{name}: {csv_name}")
        else:
            text = replace_block(text, name, f"Not run yet (no {csv_name} in {results.name}/).")
            done.append(f"{name}: not run yet")
    if (results / "stage0_effects.csv").exists():
        plot_stage0(read_csv(results / "stage0_effects.csv"), results / "stage0.png")
    doc.write_text(text)
    return done
