"""Logging set-up and the metrics.jsonl writer/reader."""
from __future__ import annotations

import io
import logging
import os
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


def test_wandb_init_resumes_the_run_id_kept_in_the_run_dir(tmp_path, monkeypatch):
    """Two attempts of a requeued job: both call wandb.init with the id stored in <run>/wandb_id and
    resume="allow". wandb is not installed here; a stand-in module records the calls MetricSinks makes."""
    import types

    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    for attempt in range(2):
        sinks = telemetry.MetricSinks(run, wandb=True, wandb_project="p", config={"seed": 1})
        sinks.log({"loss": 0.5}, step=attempt)
        sinks.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    run_id = (run / "wandb_id").read_text().strip()
    assert len(run_id) == 16 and inits[0] == inits[1] == {
        "project": "p", "name": "run", "dir": str(run), "config": {"seed": 1}, "id": run_id, "resume": "allow"}
    assert ("log", 1) in calls and os.environ["WANDB_MODE"] == "offline"  # offline unless the user says otherwise


def test_wandb_init_kwargs_without_wandb(tmp_path):
    kwargs = telemetry.wandb_init_kwargs(tmp_path / "r", project="proj", run_name="lpreg-rho0.01")
    assert kwargs == {"project": "proj", "name": "lpreg-rho0.01", "dir": str(tmp_path / "r"), "config": {},
                      "id": (tmp_path / "r" / "wandb_id").read_text().strip(), "resume": "allow"}
    assert telemetry.wandb_init_kwargs(tmp_path / "r", project="proj")["id"] == kwargs["id"]
