"""Task A's arms on the real trainer: collect a sweep's runs into committed CSVs, then the primary metrics, Gate G2,
the seed-paired comparison with GRPO and the verdict of docs/study.md.

``collect`` reads each task of a ``megatron-lpreg sweep`` directory (its ``config.yaml``, ``metrics.jsonl`` and
``eval.jsonl``) and writes ``<arm>_seed<s>.csv`` (per step: the columns of :data:`STEP_COLUMNS`) and
``<arm>_seed<s>_eval.csv`` (hard-set avg@8 per evaluation), plus ``runs.csv``, one row per run. It can be rerun as
runs finish: a run's CSVs are rewritten from its files each time.

The metrics, scaled from the protocol's 600 steps to a run of ``steps`` steps (docs/study.md):

- spark survival = mean ``spark_freq`` over the last ``ceil(steps / 12)`` steps (550-600 of 600) / the warm start's
  p(spark) at the decision position (Gate G1's probe on the held-out prompts);
- hard avg@8 = mean of the evaluations after ``5/6 x steps`` (the last 100 of 600);
- Gate G2: in >= 2 of 3 seeds GRPO's spark frequency over the ``ceil(steps / 12)`` steps before ``steps / 2`` is
  at most half of p(spark) (falls >= 50% by step 300 of 600), and its hard avg@8 gains < 0.03 from the evaluation
  at ``steps / 2`` to the last.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_lpreg.study.tables import read_csv, write_csv

STEP_COLUMNS = {
    "reward": "reward/mean", "entropy_all": "entropy/mean", "entropy_decision": "entropy/first_token",
    "spark_freq": "diag/spark_first_frac", "noise_freq": "diag/noise_first_frac",
    "spark_negative_frac": "diag/spark_negative_frac", "lpreg/num_regularized": "lpreg/num_regularized",
    "lpreg_selected_spark": "diag/lpreg_selected_spark", "lpreg_selected_noise": "diag/lpreg_selected_noise",
    "lpreg_selected_other": "diag/lpreg_selected_other", "lpreg_kl_cancel": "diag/lpreg_kl_cancel",
    "skipped": "actor/skipped",
    **{f"hist_{sign}_{i}": f"diag/hist_{sign[:3]}_{i}" for sign in ("positive", "negative") for i in range(7)},
}
"""Per-step CSV column -> metrics.jsonl key (the column names of the in-process rerun's CSVs, so that
:func:`megatron_lpreg.study.tables.plot_curves` draws both)."""
HARD_KEY = "eval/hard/avg@8"
ARMS = ("grpo", "entropy", "lpreg_authors", "lpreg_rho_star", "lpreg_global")
LPREG_ARMS = ARMS[2:]
NO_EFFECT = 0.05
"""Differences under this are reported as no effect (issue 20)."""


MECHANISM_ARMS = ("grpo_off", "clip_higher_off", "kl_cov_off", "lpreg_rho_star_off", "lpreg_rho_star_kappa0.1")
"""The mechanism runs (seed 1): off-policy (4 updates per step) arms and kappa 0.1, which filters the spark."""


def arm_of(config: dict) -> str:
    """The study arm a resolved run config belongs to (:data:`ARMS`, :data:`MECHANISM_ARMS`).

    Raises:
        ValueError: a config that is none of the study's arms.
    """
    algo = config["algo"]
    names = {"grpo": "grpo", "entropy": "entropy", "dapo": "clip_higher", "kl_cov": "kl_cov"}
    if algo["name"] in names:
        arm = names[algo["name"]]
    elif algo["name"] == "lpreg":
        arm = ("lpreg_global" if algo.get("selection") == "global" else
               "lpreg_authors" if float(algo["rho"]) == 0.01 else "lpreg_rho_star")
        if float(algo.get("kappa", 0.02)) != 0.02:
            arm += f"_kappa{float(algo['kappa']):g}"
    else:
        raise ValueError(f"algo.name={algo['name']!r} is not one of the study's Task A arms {ARMS}")
    if int(config.get("trainer", {}).get("updates_per_step", 1)) > 1:
        arm += "_off"
    return arm


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(sweeps: Path | Sequence[Path], dest: Path) -> list[dict]:
    """Write the CSVs of every run of ``sweeps`` (their ``task_*`` directories) into ``dest``; a run of a later
    sweep replaces the same arm and seed of an earlier one (a rerun). Returns ``runs.csv``'s rows (``run, arm, seed,
    rho, steps_done, max_steps, warm_start, complete, sweep``)."""
    dest.mkdir(parents=True, exist_ok=True)
    tasks = [task for sweep in ([sweeps] if isinstance(sweeps, Path) else sweeps)
             for task in sorted(sweep.glob("task_*"), key=lambda p: int(p.name.split("_")[1]))]
    index: dict[str, dict] = {}
    for task in tasks:
        if not (task / "config.yaml").exists():
            continue
        config = yaml.safe_load((task / "config.yaml").read_text())
        arm, seed = arm_of(config), int(config["seed"])
        steps = [{"step": r["step"], **{col: r.get(key, "") for col, key in STEP_COLUMNS.items()}}
                 for r in _jsonl(task / "metrics.jsonl")]
        evals = [{"step": r["step"], "hard_avg8": r[HARD_KEY]} for r in _jsonl(task / "eval.jsonl") if HARD_KEY in r]
        name = f"{arm}_seed{seed}"
        write_csv(steps or [{"step": ""}], dest / f"{name}.csv")
        write_csv(evals or [{"step": ""}], dest / f"{name}_eval.csv")
        max_steps = int(config["trainer"]["max_steps"])
        warm = Path(config["model"]["hf_path"])
        index[name] = {"run": name, "arm": arm, "seed": seed, "rho": config["algo"]["rho"], "steps_done": len(steps),
                       "max_steps": max_steps, "warm_start": warm.resolve().name if warm.exists() else warm.name,
                       "complete": len(steps) == max_steps and any(e["step"] == max_steps for e in evals),
                       "sweep": task.parent.name}
    write_csv(list(index.values()), dest / "runs.csv")
    return list(index.values())


def _floats(rows: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key, "") != ""]


def run_summary(dest: Path, run: dict, p_spark0: float) -> dict:
    """The primary metrics of one complete run (see the module docstring)."""
    steps, evals = read_csv(dest / f"{run['run']}.csv"), read_csv(dest / f"{run['run']}_eval.csv")
    total = int(run["max_steps"])
    window = math.ceil(total / 12)
    last = steps[-window:]
    mid = [r for r in steps if total // 2 - window <= int(r["step"]) < total // 2]
    late = [r for r in evals if int(r["step"]) > total * 5 / 6]
    at_mid = [r for r in evals if int(r["step"]) == total // 2]
    spark_last = sum(_floats(last, "spark_freq")) / len(last)
    return {
        "arm": run["arm"], "seed": int(run["seed"]), "rho": run["rho"] if run["arm"].startswith("lpreg") else "",
        "spark_p0": p_spark0,
        "spark_survival": spark_last / p_spark0,
        "spark_freq_mid": sum(_floats(mid, "spark_freq")) / max(len(mid), 1),
        "hard_avg8": sum(_floats(late, "hard_avg8")) / max(len(late), 1),
        "hard_avg8_step0": _floats(evals[:1], "hard_avg8")[0] if evals else float("nan"),
        "hard_gain_mid_to_end": (_floats(evals[-1:], "hard_avg8")[0] - _floats(at_mid, "hard_avg8")[0]
                                 if at_mid and evals else float("nan")),
        "noise_freq": sum(_floats(last, "noise_freq")) / len(last),
        "entropy_decision": sum(_floats(last, "entropy_decision")) / len(last),
        "regularized_per_step": sum(_floats(steps, "lpreg/num_regularized")) / len(steps),
        "spark_selected_per_step": sum(_floats(steps, "lpreg_selected_spark")) / len(steps),
        "skipped_steps": int(sum(_floats(steps, "skipped"))),
    }


def one_sided_p_df2(diffs: Sequence[float]) -> float:
    """One-sided paired t-test p-value that the mean of three differences is > 0 (Student t with 2 degrees of
    freedom, whose CDF is closed-form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)))."""
    if len(diffs) != 3:
        raise ValueError(f"the closed form is for 3 seed pairs; got {len(diffs)}")
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    if sd == 0:
        return 0.0 if mean > 0 else 1.0
    t = mean / (sd / math.sqrt(3))
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def compare(summaries: Sequence[dict]) -> tuple[list[dict], dict]:
    """Per-arm rows (mean, min, max over seeds; seed-paired differences with GRPO; Holm over the Lp-Reg arms) and
    the verdict dict (``g2``, ``reproduced_by``, ``partial_by``, ``verdict``)."""
    by = {(s["arm"], s["seed"]): s for s in summaries}
    seeds = sorted({s["seed"] for s in summaries if s["arm"] == "grpo"})
    rows, p_hard, p_surv = [], {}, {}
    for arm in ARMS:
        mine = [by[(arm, seed)] for seed in seeds if (arm, seed) in by]
        if not mine:
            continue
        row = {"arm": arm, "seeds": len(mine), "rho": mine[0]["rho"]}
        for key in ("spark_survival", "hard_avg8", "noise_freq", "entropy_decision", "regularized_per_step",
                    "spark_selected_per_step"):
            values = [m[key] for m in mine]
            row.update({key: sum(values) / len(values), f"{key}_min": min(values), f"{key}_max": max(values)})
        if arm != "grpo" and len(mine) == len(seeds):
            grpo = [by[("grpo", seed)] for seed in seeds]
            ratio = [m["spark_survival"] / max(g["spark_survival"], 1e-12) for m, g in zip(mine, grpo)]
            diff = [m["hard_avg8"] - g["hard_avg8"] for m, g in zip(mine, grpo)]
            row.update({"survival_vs_grpo_min": min(ratio), "hard_diff": sum(diff) / len(diff),
                        "hard_diff_min": min(diff), "hard_diff_max": max(diff),
                        "noise_vs_grpo": sum(m["noise_freq"] - g["noise_freq"] for m, g in zip(mine, grpo))
                        / len(mine)})
            if arm in LPREG_ARMS and len(seeds) == 3:
                p_hard[arm] = one_sided_p_df2(diff)
                p_surv[arm] = one_sided_p_df2([math.log(max(r, 1e-12)) for r in ratio])
        rows.append(row)
    adj_hard, adj_surv = holm(p_hard), holm(p_surv)
    for row in rows:
        if row["arm"] in adj_hard:
            row.update({"p_hard_holm": adj_hard[row["arm"]], "p_survival_holm": adj_surv[row["arm"]]})
    return rows, _verdict(rows, [by[("grpo", s)] for s in seeds])


def _verdict(rows: Sequence[dict], grpo: Sequence[dict]) -> dict:
    g2_seeds = sum(g["spark_freq_mid"] <= 0.5 * g["spark_p0"] and g["hard_gain_mid_to_end"] < 0.03 for g in grpo)
    out = {"g2_seeds": g2_seeds, "g2": g2_seeds >= 2, "reproduced_by": [], "partial_by": []}
    for row in rows:
        if row["arm"] not in LPREG_ARMS or "p_hard_holm" not in row:
            continue
        survival = row["survival_vs_grpo_min"] >= 2.0 and row["p_survival_holm"] < 0.05
        hard = row["hard_diff"] >= NO_EFFECT and row["hard_diff_min"] > 0 and row["p_hard_holm"] < 0.05
        noise_ok = row["noise_vs_grpo"] <= 0
        if survival and hard and noise_ok:
            out["reproduced_by"].append(row["arm"])
        elif survival or hard:
            out["partial_by"].append(row["arm"])
    if not out["g2"]:
        out["verdict"] = "not evaluable: Gate G2 (the trap) failed"
    elif out["reproduced_by"]:
        out["verdict"] = "reproduced"
    elif out["partial_by"]:
        out["verdict"] = "partial"
    else:
        out["verdict"] = "not reproduced"
    return out


MECHANISM_DIR = "task_a_mechanism"
"""Sub-directory of docs/study/ with the mechanism runs (seed 1)."""
RUNS_DIR = "task_a"
"""Sub-directory of docs/study/ with the collected runs (``runs.csv`` and each run's CSVs)."""
PLOT_NAME = "task_a_curves.png"
EVAL_PLOT = "task_a_eval_hist.png"


def summaries(results: Path, runs_dir: str = RUNS_DIR) -> list[dict]:
    """Every complete run of ``results/<runs_dir>/runs.csv`` summarised, p(spark) at step 0 taken from the warm
    start's row of ``results/g1.csv``."""
    dest = results / runs_dir
    g1 = {f"warm_start_{row['attempt']}": row for row in read_csv(results / "g1.csv")}
    out = []
    for run in read_csv(dest / "runs.csv"):
        if run["complete"] != "True":
            continue
        if run["warm_start"] not in g1:
            raise ValueError(f"{run['run']}: warm start {run['warm_start']} has no row in {results / 'g1.csv'}")
        out.append(run_summary(dest, run, float(g1[run["warm_start"]]["p_spark"])))
    return out


def plot_eval_and_histograms(results: Path, done: Sequence[dict], out: Path) -> Path:
    """Hard-set avg@8 per evaluation and the noise frequency (mean and min-max over seeds per arm), and the
    sampled-token probability histograms of positive vs negative samples summed over each arm's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    arms = [a for a in ARMS if any(r["arm"] == a for r in done)]
    for index, arm in enumerate(arms):
        names = [f"{arm}_seed{r['seed']}" for r in done if r["arm"] == arm]
        for ax, suffix, key, title in ((axes[0], "_eval", "hard_avg8", "hard-set avg@8"),
                                       (axes[1], "", "noise_freq", "noise frequency (first token)")):
            series = [[(int(r["step"]), float(r[key])) for r in read_csv(results / RUNS_DIR / f"{n}{suffix}.csv")
                       if r.get(key, "") != ""] for n in names]
            width = min(map(len, series))
            steps = [p[0] for p in series[0][:width]]
            columns = list(zip(*([p[1] for p in s[:width]] for s in series)))
            ax.plot(steps, [sum(c) / len(c) for c in columns], label=f"{arm} ({len(series)})", color=f"C{index}")
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2,
                            color=f"C{index}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        for ax, sign in ((axes[2], "positive"), (axes[3], "negative")):
            counts = [sum(sum(_floats(read_csv(results / RUNS_DIR / f"{n}.csv"), f"hist_{sign}_{b}")) for n in names)
                      for b in range(7)]
            total = sum(counts) or 1.0
            ax.bar([b + (index - len(arms) / 2) * 0.15 for b in range(7)], [c / total for c in counts], width=0.15,
                   label=arm, color=f"C{index}")
            ax.set_xticks(range(7), ["<1e-6", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "0.1-1"], fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"sampled-token probability, {sign} samples (share)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def render(results: Path) -> str:
    """docs/study.md's Task A block: runs, per-arm table, Gate G2 and the verdict; draws the curves."""
    from megatron_lpreg.study.tables import markdown_table, plot_curves

    runs = read_csv(results / RUNS_DIR / "runs.csv")
    done = summaries(results)
    if not done:
        return f"No complete run yet ({len(runs)} started)."
    rows, verdict = compare(done)
    per_run = markdown_table(sorted(done, key=lambda r: (ARMS.index(r["arm"]), r["seed"])),
                             ["arm", "seed", "rho", "spark_survival", "spark_freq_mid", "hard_avg8", "hard_avg8_step0",
                              "hard_gain_mid_to_end", "noise_freq", "regularized_per_step",
                              "spark_selected_per_step", "skipped_steps"])
    columns = ["arm", "seeds", "rho", "spark_survival", "spark_survival_min", "spark_survival_max", "hard_avg8",
               "hard_avg8_min", "hard_avg8_max", "noise_freq", "entropy_decision"]
    per_arm = markdown_table(rows, columns)
    paired = [{"p_survival_holm": "", "p_hard_holm": "", **r} for r in rows if "hard_diff" in r]
    paired_columns = ["arm", "survival_vs_grpo_min", "hard_diff", "hard_diff_min", "hard_diff_max", "noise_vs_grpo",
                      "p_survival_holm", "p_hard_holm"]
    paired_table = markdown_table(paired, paired_columns) if paired else "(no arm with every GRPO seed yet)"
    incomplete = [r["run"] for r in runs if r["complete"] != "True"]
    plot_curves({arm: [results / RUNS_DIR / f"{arm}_seed{r['seed']}.csv" for r in done if r["arm"] == arm]
                 for arm in ARMS if any(r["arm"] == arm for r in done)}, results / PLOT_NAME)
    plot_eval_and_histograms(results, done, results / EVAL_PLOT)
    lines = [
        f"Complete runs: {len(done)} of {len(runs)}" + (f" (not complete: {', '.join(incomplete)})" if incomplete
                                                         else ""),
        "", "Per run:", "", per_run, "", "Per arm (mean, min, max over seeds):", "", per_arm, "",
        "Seed-paired with GRPO (Holm over the Lp-Reg arms, one-sided paired t, 2 d.f.):", "", paired_table, "",
        f"- Gate G2 (GRPO's spark frequency halves by mid-run and its hard avg@8 gains < 0.03 after): "
        f"{verdict['g2_seeds']} of {sum(r['arm'] == 'grpo' for r in done)} seeds -> "
        f"{'passes' if verdict['g2'] else 'fails'}",
        f"- Reproduced by: {', '.join(verdict['reproduced_by']) or 'none'}; partial: "
        f"{', '.join(verdict['partial_by']) or 'none'}",
        f"- **Verdict (by the protocol's rules, on these runs): {verdict['verdict']}**",
        "", f"![Task A curves](study/{PLOT_NAME})", "", f"![Task A evaluations and histograms](study/{EVAL_PLOT})",
    ]
    return "\n".join(lines)


def render_mechanism(results: Path) -> str:
    """docs/study.md's mechanism block (seed 1): each run's metrics next to the GRPO run it is compared with
    (on-policy GRPO seed 1 from the core runs for kappa 0.1; off-policy GRPO for the off-policy arms)."""
    from megatron_lpreg.study.tables import markdown_table, plot_curves

    done = summaries(results, MECHANISM_DIR)
    core = {(s["arm"], s["seed"]): s for s in (summaries(results) if (results / RUNS_DIR / "runs.csv").exists()
                                                 else [])}
    mine = {(s["arm"], s["seed"]): s for s in done}
    rows = []
    for run in sorted(done, key=lambda r: (MECHANISM_ARMS.index(r["arm"]) if r["arm"] in MECHANISM_ARMS else 99)):
        base = mine.get(("grpo_off", run["seed"])) if run["arm"].endswith("_off") else core.get(("grpo", run["seed"]))
        rows.append({**run, "vs": base["arm"] if base else "",
                     "survival_vs_grpo": run["spark_survival"] / max(base["spark_survival"], 1e-12) if base else "",
                     "hard_diff": run["hard_avg8"] - base["hard_avg8"] if base else ""})
    if not rows:
        return "No complete run yet."
    plot_curves({r["arm"]: [results / MECHANISM_DIR / f"{r['arm']}_seed{r['seed']}.csv"] for r in rows},
                results / "task_a_mechanism_curves.png")
    table = markdown_table(rows, ["arm", "seed", "rho", "spark_survival", "hard_avg8", "noise_freq",
                                  "regularized_per_step", "spark_selected_per_step", "vs", "survival_vs_grpo",
                                  "hard_diff"])
    return table + "\n\n![Task A mechanism runs](study/task_a_mechanism_curves.png)"
