"""report.json / report.md writing: sections at the top level with a status, strict JSON, a readable table."""
from __future__ import annotations

import json
import math

import pytest

from megatron_lpreg.gpucheck.report import (
    SECTION_NAMES,
    build_report,
    render_markdown,
    section_failed,
    section_ok,
    section_skipped,
    write_report,
)

ENV = {"device": "cpu", "torch": "2.13.0+cpu"}


def _all_ok() -> dict:
    return {name: section_ok({"seconds": 1.5, "max_err": 1e-6}) for name in SECTION_NAMES}


def test_write_report_puts_sections_at_top_level_and_writes_both_files(tmp_path):
    report = write_report(tmp_path / "out", _all_ok(), ENV)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report
    assert on_disk["ok"] is True
    assert on_disk["environment"] == ENV
    for name in SECTION_NAMES:
        assert on_disk[name] == {"status": "ok", "seconds": 1.5, "max_err": 1e-6}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Overall: **ok**" in md
    for name in SECTION_NAMES:
        assert f"| {name} | ok |" in md and f"### {name}" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]  # no temp files left


def test_one_failed_or_skipped_section_makes_the_report_not_ok(tmp_path):
    sections = _all_ok()
    sections["op_speed"] = section_failed("fused op and megatron disagree | badly", {"fp32": {"diff": 0.5}})
    sections["model_parity"] = section_skipped("no transformer_engine")
    report = write_report(tmp_path, sections, ENV)
    assert report["ok"] is False
    assert report["op_speed"] == {"status": "failed", "error": "fused op and megatron disagree | badly",
                                  "fp32": {"diff": 0.5}}
    md = (tmp_path / "report.md").read_text()
    assert "Overall: **NOT ok**" in md
    assert "| op_speed | failed | fused op and megatron disagree \\| badly |" in md  # pipe escaped in the table
    assert "| model_parity | skipped | no transformer_engine |" in md
    assert "- fp32: diff=0.5" in md


def test_non_finite_numbers_are_written_as_strings_in_strict_json(tmp_path):
    sections = {"op_parity": section_failed("nan", {"err": math.nan, "nested": [math.inf, 1.0]})}
    write_report(tmp_path, sections, ENV)
    text = (tmp_path / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert report["op_parity"]["err"] == "nan" and report["op_parity"]["nested"] == ["inf", 1.0]


@pytest.mark.parametrize("section,message", [
    ({"status": "passed"}, "status='passed' must be one of"),
    ({"seconds": 1.0}, "status=None must be one of"),
    ({"status": "failed"}, "no 'error' text"),
    ({"status": "skipped", "reason": ""}, "no 'reason' text"),
])
def test_bad_sections_are_refused(section, message):
    with pytest.raises(ValueError, match=message):
        build_report({"op_parity": section}, ENV)


def test_reserved_and_empty():
    with pytest.raises(ValueError, match="reserved"):
        build_report({"environment": section_ok({})}, ENV)
    assert build_report({}, ENV)["ok"] is False  # nothing ran: not ok
    assert "| train_steps | ok |" in render_markdown(build_report({"train_steps": section_ok({})}, ENV))
