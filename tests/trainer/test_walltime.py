"""The walltime guard with fake clocks and a fake Slurm: where the end time comes from, and when the next step and
a save no longer fit. The end-to-end exit with the requeue code is in tests/trainer/test_preemption.py."""
from __future__ import annotations

from datetime import datetime

import pytest

from megatron_lpreg.trainer.walltime import WINDOW, WalltimeGuard, job_end_time, parse_slurm_time


class FakeSlurm:
    """Answers squeue/scontrol like Slurm 22.05 does, and records the calls."""

    def __init__(self, squeue: str = "", scontrol: str = "") -> None:
        self.answers = {"squeue": squeue, "scontrol": scontrol}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> str:
        self.calls.append(argv)
        return self.answers[argv[0]]


def test_end_time_from_the_environment_wins_and_asks_nothing():
    slurm = FakeSlurm(squeue="2026-12-07T06:30:00\n")
    assert job_end_time({"SLURM_JOB_END_TIME": "1796711400", "SLURM_JOB_ID": "7"}, run=slurm) == 1796711400.0
    assert slurm.calls == []


def test_end_time_asked_from_squeue_once_then_scontrol():
    slurm = FakeSlurm(squeue="2026-12-07T06:30:00\n")
    expected = datetime(2026, 12, 7, 6, 30).timestamp()
    assert job_end_time({"SLURM_JOB_ID": "7"}, run=slurm) == expected
    assert slurm.calls == [["squeue", "-h", "-j", "7", "-o", "%e"]]
    slurm = FakeSlurm(squeue="", scontrol="JobId=7 StartTime=2026-12-07T06:00:00 EndTime=2026-12-07T06:30:00 x")
    assert job_end_time({"SLURM_JOB_ID": "7"}, run=slurm) == expected
    assert [c[0] for c in slurm.calls] == ["squeue", "scontrol"]


def test_an_array_task_asks_for_itself_not_the_whole_array():
    # Slurm 22.05: an array's task can have the array's own job id, and `squeue -j <that id>` lists every task
    slurm = FakeSlurm(squeue="2026-12-07T06:30:00\n")
    env = {"SLURM_JOB_ID": "1", "SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "1"}
    assert job_end_time(env, run=slurm) == datetime(2026, 12, 7, 6, 30).timestamp()
    assert slurm.calls == [["squeue", "-h", "-j", "1_1", "-o", "%e"]]
    two_lines = FakeSlurm(squeue="2026-12-07T06:30:00\n2026-12-07T07:00:00\n")
    assert job_end_time({"SLURM_JOB_ID": "1"}, run=two_lines) == datetime(2026, 12, 7, 6, 30).timestamp()


def test_no_end_time_outside_slurm_or_without_a_limit():
    slurm = FakeSlurm(squeue="N/A\n", scontrol="JobId=7 EndTime=Unknown")
    assert job_end_time({}, run=slurm) is None and slurm.calls == []
    assert job_end_time({"SLURM_JOB_ID": "7"}, run=slurm) is None
    assert parse_slurm_time("NONE") is None and parse_slurm_time("") is None


def test_a_bad_end_time_variable_is_named():
    with pytest.raises(ValueError, match="SLURM_JOB_END_TIME='soon' is not epoch seconds"):
        job_end_time({"SLURM_JOB_END_TIME": "soon"})


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_stops_when_the_next_step_and_a_save_and_the_margin_do_not_fit():
    clock = Clock()
    guard = WalltimeGuard(end_time=1000.0 + 100, margin_s=10, clock=clock)
    assert not guard.should_stop()  # nothing measured yet: 0 + 0 + 10 < 100
    guard.record_step(30)
    assert guard.save_estimate() == 30  # before any save: one step
    clock.now += 30  # 70 s left: 30 + 30 + 10 = 70 still fits
    assert not guard.should_stop()
    clock.now += 1  # 69 s left
    assert guard.should_stop()
    assert "next step (~30 s) + a save (~30 s) + trainer.walltime_margin_s=10" in guard.reason()


def test_estimates_are_the_longest_recent_step_and_the_longest_save():
    guard = WalltimeGuard(end_time=None, margin_s=0)
    for seconds in (50, 10, 10, 10, 10):
        guard.record_step(seconds)
    assert guard.step_estimate() == 50
    guard.record_step(10)  # the 50 s step leaves the window of the last WINDOW steps
    assert WINDOW == 5 and guard.step_estimate() == 10
    guard.record_load(7)
    assert guard.save_estimate() == 7  # a resumed run: the load time until a save is measured
    guard.record_save(20)
    guard.record_save(5)
    assert guard.save_estimate() == 20
    assert not guard.should_stop() and guard.time_left() is None  # no end time: never stops


def test_a_saved_estimate_moves_the_stop_earlier():
    clock = Clock()
    guard = WalltimeGuard(end_time=1000.0 + 200, margin_s=0, clock=clock)
    guard.record_step(20)
    assert not guard.should_stop()
    guard.record_save(170)  # a slow file system: 20 + 170 <= 200, then one second later not
    assert not guard.should_stop()
    clock.now += 11
    assert guard.should_stop()


def test_the_next_steps_evaluation_is_counted_when_one_is_due():
    clock = Clock()
    guard = WalltimeGuard(end_time=1000.0 + 100, margin_s=0, clock=clock)
    guard.record_step(20, evaluation_s=30)  # a step that ended with a 30 s held-out evaluation
    guard.record_step(20)
    assert guard.step_estimate() == 20 and guard.step_estimate(evaluates=True) == 50
    assert not guard.should_stop() and not guard.should_stop(evaluates=True)  # 20 + 20 / 50 + 20 <= 100
    clock.now += 31  # 69 s left: a plain step and a save fit, one with an evaluation does not
    assert not guard.should_stop() and guard.should_stop(evaluates=True)
    assert "the next step (~50 s)" in guard.reason()
