"""The reduced rerun (``megatron-lpreg study rerun``) end to end with 2 steps from the untrained tiny model, and
Gate G1's thresholds."""
from __future__ import annotations

import csv
import re

import pytest

from megatron_lpreg.study.warmstart import GateG1


@pytest.mark.slow
def test_rerun_two_steps_prints_the_contract_line(tmp_path):
    from megatron_lpreg.study.rerun import rerun
    from megatron_lpreg.study.warmstart import load_base

    base, _, _ = load_base()
    line = rerun(tmp_path, seed=3, steps=2, warm_dir=base)
    number = r"[0-9.]+(?:e-?[0-9]+)?"
    assert re.fullmatch(rf"study-rerun: grpo spark_survival={number} hard_acc={number}; lpreg_rho_star "
                        rf"spark_survival={number} hard_acc={number}", line), line
    for arm in ("grpo", "lpreg_rho_star"):
        rows = list(csv.DictReader((tmp_path / f"{arm}_metrics.csv").open()))
        assert [r["step"] for r in rows] == ["0", "1"]
        assert 0.0 <= float(rows[0]["spark_freq"]) <= 1.0
    lpreg_rows = list(csv.DictReader((tmp_path / "lpreg_rho_star_metrics.csv").open()))
    assert "lpreg_class/spark" in lpreg_rows[0] and "lpreg/num_regularized" in lpreg_rows[0]
    assert "lpreg/kl_cancel_fraction" in lpreg_rows[0] and "hist_negative_0" in rows[0]
    assert (tmp_path / "rerun_curves.png").stat().st_size > 1000
    summary = list(csv.DictReader((tmp_path / "rerun_summary.csv").open()))
    assert [r["arm"] for r in summary] == ["grpo", "lpreg_rho_star"]


def test_gate_g1_thresholds_are_the_issue_s():
    ok = {"p_spark": 0.05, "noise_max_rel": 0.01, "mass_below_cut": 0.2, "direct_easy": 0.85, "direct_hard": 0.2,
          "spark_easy": 0.6, "spark_hard": 0.31}
    assert all(GateG1().checks(ok).values())
    for key, bad in (("p_spark", 0.09), ("noise_max_rel", 0.02), ("mass_below_cut", 0.31), ("direct_easy", 0.79),
                     ("direct_hard", 0.31), ("spark_easy", 0.76), ("spark_hard", 0.29)):
        checks = GateG1().checks({**ok, key: bad})
        assert [name for name, passed in checks.items() if not passed], key


def test_warm_start_refuses_more_than_three_attempts(tmp_path):
    from megatron_lpreg.study.warmstart import warm_start_with_gate

    with pytest.raises(ValueError, match="3 in all"):
        warm_start_with_gate(tmp_path, attempts=2, first_attempt=2)
    with pytest.raises(ValueError, match="1 to 3"):
        warm_start_with_gate(tmp_path, attempts=4)


def test_rho_star_row_is_a_grid_value_and_appends(tmp_path):
    from megatron_lpreg.study.rerun import RHO_GRID, rho_star_row
    from megatron_lpreg.study.warmstart import load_base

    base, _, _ = load_base()
    first = rho_star_row(base, seed=2, out=tmp_path / "rho.csv")
    assert first["rho_star"] in RHO_GRID
    shares = [first[f"spark_selected_at_{rho:g}"] for rho in RHO_GRID]
    assert all(0.0 <= s <= 1.0 for s in shares)
    # rho* is the smallest rho selecting >= half of the negative-sample sparks, else the largest
    assert first["rho_star"] == next((r for r, s in zip(RHO_GRID, shares) if s >= 0.5), RHO_GRID[-1])
    rho_star_row(base, seed=2, out=tmp_path / "rho.csv")
    rows = list(csv.DictReader((tmp_path / "rho.csv").open()))
    assert len(rows) == 2 and rows[0] == rows[1]  # same seed, same batches, same answer
