"""``megatron-lpreg study report``: docs/study.md's blocks re-rendered from the CSVs, the rest left alone."""
from __future__ import annotations

import shutil

import pytest

from megatron_lpreg.study.report import RESULTS_DIR, STUDY_DOC, regenerate, replace_block


def test_report_fills_blocks_from_csvs_and_marks_missing_ones(tmp_path):
    results, doc = tmp_path / "study", tmp_path / "study.md"
    results.mkdir()
    shutil.copy(RESULTS_DIR / "stage0_effects.csv", results)
    doc.write_text(STUDY_DOC.read_text())
    before = doc.read_text()
    done = regenerate(results, doc)
    text = doc.read_text()
    assert "stage0: stage0_effects.csv" in done and "g1: not run yet" in done
    assert "| arm | tail_mass |" in text and "Not run yet (no g1.csv" in text
    assert (results / "stage0.png").stat().st_size > 1000
    assert text.split("<!-- study-report:stage0:begin -->")[0] == before.split("<!-- study-report:stage0:begin -->")[0]
    regenerate(results, doc)
    assert doc.read_text() == text  # idempotent


def test_replace_block_refuses_a_missing_block():
    with pytest.raises(ValueError, match="no block"):
        replace_block("no markers here", "stage0", "x")
