"""study/arms.py: collecting a sweep's runs, the primary metrics scaled to the run length, Gate G2, the seed-paired
comparison (closed-form t with 2 d.f., Holm) and the verdict, on hand-built runs with known answers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from megatron_lpreg.study.arms import (
    arm_of,
    collect,
    compare,
    holm,
    one_sided_p_df2,
    render,
    summaries,
)

STEPS = 24  # window = ceil(24 / 12) = 2 steps; mid = step 12; late evals: step > 20
P0 = 0.05


def _algo(arm: str) -> dict:
    return {"grpo": {"name": "grpo", "rho": 0.01}, "entropy": {"name": "entropy", "rho": 0.01},
            "lpreg_authors": {"name": "lpreg", "rho": 0.01, "selection": "reference"},
            "lpreg_rho_star": {"name": "lpreg", "rho": 0.1, "selection": "reference"},
            "lpreg_global": {"name": "lpreg", "rho": 0.1, "selection": "global"}}[arm]


def _run(task: Path, arm: str, seed: int, spark_end: float, hard_end: float, *, spark_mid: float, noise: float = 0.1,
         steps: int = STEPS, hard_mid: float = 0.0) -> None:
    task.mkdir(parents=True)
    config = {"seed": seed, "algo": _algo(arm), "trainer": {"max_steps": STEPS},
              "model": {"hf_path": str(task.parent / "warm_start_4")}}
    (task / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step in range(steps):
        spark = spark_end if step >= STEPS - 2 else spark_mid if STEPS // 2 - 2 <= step < STEPS // 2 else 0.3
        rows.append({"step": step, "reward/mean": 0.5, "entropy/mean": 0.2, "entropy/first_token": 0.4,
                     "diag/spark_first_frac": spark, "diag/noise_first_frac": noise, "lpreg/num_regularized": 2.0,
                     **{f"diag/hist_{s}_{b}": float(b + 1) for s in ("pos", "neg") for b in range(7)}})
    (task / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [(0, 0.0), (STEPS // 2, hard_mid), (22, hard_end - 0.01), (24, hard_end + 0.01)]
    (task / "eval.jsonl").write_text("".join(json.dumps({"step": s, "eval/hard/avg@8": v}) + "\n"
                                             for s, v in evals if s <= steps))


def _results(tmp_path: Path, lpreg_hard: tuple[float, float, float], lpreg_spark: float = 0.02) -> Path:
    sweep, results = tmp_path / "sweep", tmp_path / "results"
    (sweep / "warm_start_4").mkdir(parents=True)
    task = 0
    for arm in ("grpo", "entropy", "lpreg_authors", "lpreg_rho_star", "lpreg_global"):
        for seed in (1, 2, 3):
            good = arm == "lpreg_rho_star"
            _run(sweep / f"task_{task}", arm, seed, (lpreg_spark if good else 0.005) * seed,
                 lpreg_hard[seed - 1] if good else 0.02, spark_mid=0.01 if arm == "grpo" else 0.05,
                 hard_mid=0.01)
            task += 1
    results.mkdir()
    (results / "g1.csv").write_text(f"attempt,p_spark\n4,{P0}\n")
    collect(sweep, results / "task_a")
    return results


def test_arm_of_names_each_row_of_the_sweep():
    assert [arm_of({"algo": _algo(a)}) for a in ("grpo", "entropy", "lpreg_authors", "lpreg_rho_star",
                                                 "lpreg_global")] == ["grpo", "entropy", "lpreg_authors",
                                                                      "lpreg_rho_star", "lpreg_global"]
    with pytest.raises(ValueError, match="gspo"):
        arm_of({"algo": {"name": "gspo"}})


def test_collect_writes_csvs_and_an_index_that_marks_incomplete_runs(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "warm_start_4").mkdir(parents=True)
    _run(sweep / "task_0", "grpo", 1, 0.0, 0.0, spark_mid=0.0)
    _run(sweep / "task_1", "grpo", 2, 0.0, 0.0, spark_mid=0.0, steps=10)  # still running
    index = collect(sweep, tmp_path / "out")
    assert [(r["run"], r["complete"], r["warm_start"]) for r in index] == [("grpo_seed1", True, "warm_start_4"),
                                                                         ("grpo_seed2", False, "warm_start_4")]
    rows = list(csv.DictReader((tmp_path / "out" / "grpo_seed1.csv").open()))
    assert len(rows) == STEPS and rows[0]["spark_freq"] == "0.3" and rows[0]["entropy_decision"] == "0.4"
    assert (tmp_path / "out" / "runs.csv").exists()
    rerun = tmp_path / "rerun"  # a later sweep's run of the same arm and seed replaces the earlier one
    (rerun / "warm_start_4").mkdir(parents=True)
    _run(rerun / "task_0", "grpo", 2, 0.0, 0.0, spark_mid=0.0)
    index = collect([sweep, rerun], tmp_path / "out")
    assert [(r["run"], r["complete"], r["sweep"]) for r in index] == [("grpo_seed1", True, "sweep"),
                                                                    ("grpo_seed2", True, "rerun")]
    assert len(list(csv.DictReader((tmp_path / "out" / "grpo_seed2.csv").open()))) == STEPS


def test_metrics_are_the_protocol_s_scaled_to_the_run_length(tmp_path):
    results = _results(tmp_path, (0.2, 0.25, 0.3))
    by = {(s["arm"], s["seed"]): s for s in summaries(results)}
    grpo = by[("grpo", 2)]
    assert grpo["spark_survival"] == pytest.approx(0.01 / P0)  # last 2 steps at 0.005 x seed / p0
    assert grpo["spark_freq_mid"] == pytest.approx(0.01)  # steps 10-11, before mid-run
    assert grpo["hard_avg8"] == pytest.approx(0.02)  # evals after step 20: (0.01 + 0.03) / 2
    assert grpo["hard_gain_mid_to_end"] == pytest.approx(0.03 - 0.01)
    assert by[("lpreg_rho_star", 3)]["hard_avg8"] == pytest.approx(0.3)


def test_closed_form_t_matches_the_integrated_density():
    """One-sided p of a paired t-test with 3 pairs against the Student-t(2) density integrated in float64."""
    for diffs in ([0.1, 0.2, 0.15], [0.05, -0.01, 0.02], [-0.3, 0.1, 0.0]):
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        t = mean / (sd / math.sqrt(3))
        x = torch.linspace(t, t + 2000.0, 2_000_001, dtype=torch.float64)
        density = (1 + x**2 / 2) ** -1.5 / (2 * math.sqrt(2))  # Student t, 2 degrees of freedom
        tail = float(torch.trapezoid(density, x))  # the mass beyond t + 2000 is ~1e-7
        assert one_sided_p_df2(diffs) == pytest.approx(tail, abs=1e-6)


def test_holm_is_step_down_and_monotone():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.5, "b": 0.5}) == {"a": 1.0, "b": 1.0}


def test_verdict_reproduced_partial_and_gate_g2(tmp_path):
    # Lp-Reg rho* keeps 4x GRPO's sparks and gains 0.18-0.28 on hard in every seed -> reproduced
    rows, verdict = compare(summaries(_results(tmp_path / "a", (0.2, 0.25, 0.3))))
    assert verdict["g2"] and verdict["g2_seeds"] == 3  # GRPO's mid frequency 0.01 <= p0 / 2, gain 0.02 < 0.03
    assert verdict["reproduced_by"] == ["lpreg_rho_star"] and verdict["verdict"] == "reproduced"
    row = next(r for r in rows if r["arm"] == "lpreg_rho_star")
    assert row["hard_diff"] == pytest.approx(0.23) and row["p_hard_holm"] < 0.05
    # the same sparks but no hard-set gain -> partial
    _, verdict = compare(summaries(_results(tmp_path / "b", (0.02, 0.02, 0.02))))
    assert verdict["reproduced_by"] == [] and verdict["partial_by"] == ["lpreg_rho_star"]
    assert verdict["verdict"] == "partial"
    # no arm keeps the spark or gains -> not reproduced
    _, verdict = compare(summaries(_results(tmp_path / "c", (0.02, 0.02, 0.02), lpreg_spark=0.005)))
    assert verdict["verdict"] == "not reproduced"


def test_render_writes_tables_and_the_curves(tmp_path):
    results = _results(tmp_path, (0.2, 0.25, 0.3))
    text = render(results)
    assert "| lpreg_rho_star | 3 |" in text and "Verdict (by the protocol's rules, on these runs): reproduced" in text
    assert (results / "task_a_curves.png").stat().st_size > 1000
    assert (results / "task_a_eval_hist.png").stat().st_size > 1000


def test_mechanism_runs_are_named_and_compared_with_their_own_grpo(tmp_path):
    from megatron_lpreg.study.arms import render_mechanism

    off = {"trainer": {"updates_per_step": 4}}
    assert arm_of({"algo": {"name": "dapo"}, **off}) == "clip_higher_off"
    assert arm_of({"algo": {"name": "kl_cov"}, **off}) == "kl_cov_off"
    assert arm_of({"algo": {"name": "lpreg", "rho": 0.1, "kappa": 0.1}}) == "lpreg_rho_star_kappa0.1"
    results = _results(tmp_path, (0.2, 0.25, 0.3))  # the core runs (GRPO seed 1: survival 0.1)
    sweep = tmp_path / "mech"
    (sweep / "warm_start_4").mkdir(parents=True)
    _run(sweep / "task_0", "lpreg_rho_star", 1, 0.01, 0.05, spark_mid=0.05)
    config = yaml.safe_load((sweep / "task_0" / "config.yaml").read_text())
    config["algo"]["kappa"] = 0.1
    (sweep / "task_0" / "config.yaml").write_text(yaml.safe_dump(config))
    collect(sweep, results / "task_a_mechanism")
    text = render_mechanism(results)
    assert "| lpreg_rho_star_kappa0.1 | 1 | 0.1 | 0.2 | 0.05 |" in text  # survival 0.01 / 0.05, hard avg@8 0.05
    assert "| grpo | 2 | 0.03 |" in text  # vs on-policy GRPO seed 1: survival 0.2 / 0.1, hard 0.05 - 0.02
    assert (results / "task_a_mechanism_curves.png").exists()
