"""Logging set-up and the metrics.jsonl writer/reader."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from megatron_lpreg import telemetry


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_follow_the_current_stderr_after_the_old_one_is_closed(restore_root_logger, monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    telemetry.setup(0, 2)
    logging.getLogger("t").info("one")
    assert first.getvalue().endswith("INFO [rank 0/2] t: one\n")
    first.close()  # e.g. pytest's capture of an earlier test
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("t").info("two")
    assert second.getvalue().endswith("INFO [rank 0/2] t: two\n")


def test_setup_is_idempotent_and_other_ranks_log_warnings_only(restore_root_logger, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    telemetry.setup(0, 2)
    telemetry.setup(0, 2)
    telemetry.set_rank(1, 2)
    logging.getLogger("t").info("hidden")
    logging.getLogger("t").warning("shown")
    assert out.getvalue().count("shown") == 1 and "hidden" not in out.getvalue()
    assert "[rank 1/2]" in out.getvalue()


def test_metric_rows_round_trip_and_a_resume_truncates_later_steps(tmp_path):
    sinks = telemetry.MetricSinks(tmp_path)
    for step in (1, 2, 3):
        sinks.log({"loss": step * 0.5, "bad": float("nan")}, step)
    sinks.truncate_after(3)
    sinks.log({"loss": 9.0, "bad": 1.0}, 3)
    sinks.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # a run killed mid-write leaves a torn last line
    rows = telemetry.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    assert rows[0]["bad"] == "nan"
    assert telemetry.read_jsonl(tmp_path / "missing.jsonl") == []
