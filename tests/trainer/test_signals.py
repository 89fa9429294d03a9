"""The preemption plumbing in-process: handlers only while a run trains, the flag file, stale requests."""
from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_lpreg.rundir import PREEMPT_FILE, clear_stale_request
from megatron_lpreg.trainer.signals import PreemptionWatcher, forward_signals_to_run_dir


@pytest.fixture
def recorder():
    """A handler that records the signals it gets, installed for SIGUSR1/SIGTERM during the test."""
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _raise(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_watcher_turns_a_signal_into_the_flag_and_gives_the_handler_back(tmp_path, recorder, sig):
    with PreemptionWatcher(tmp_path) as watcher:
        assert not watcher.should_stop()
        _raise(sig)
        assert watcher.should_stop() and (tmp_path / PREEMPT_FILE).exists()
        watcher.clear()
        assert not (tmp_path / PREEMPT_FILE).exists()
        assert recorder == []
    _raise(sig)  # after the run: the previous handler again, and no request left behind for the next run
    assert recorder == [sig]
    assert not (tmp_path / PREEMPT_FILE).exists()


def test_the_flag_file_alone_stops_the_run(tmp_path):
    watcher = PreemptionWatcher(tmp_path, install_handlers=False)
    assert not watcher.should_stop()
    (tmp_path / PREEMPT_FILE).touch()
    assert watcher.should_stop()



def test_a_rank_of_its_own_accord_stops_the_run_without_a_flag_file(tmp_path):
    """The walltime guard's decision (``local=True``) stops the run like a signal; it leaves no request behind."""
    watcher = PreemptionWatcher(tmp_path, install_handlers=False)
    assert watcher.should_stop(local=True) and not watcher.should_stop()
    assert not (tmp_path / PREEMPT_FILE).exists()

def test_launcher_forwarding_is_scoped_to_the_block(tmp_path, recorder):
    with forward_signals_to_run_dir(tmp_path):
        _raise(signal.SIGTERM)
        assert (tmp_path / PREEMPT_FILE).exists() and recorder == []
    (tmp_path / PREEMPT_FILE).unlink()
    _raise(signal.SIGUSR1)
    assert recorder == [signal.SIGUSR1] and not (tmp_path / PREEMPT_FILE).exists()


def test_only_requests_older_than_the_launch_are_stale(tmp_path):
    flag = tmp_path / PREEMPT_FILE
    assert clear_stale_request(tmp_path, time.time()) is False  # none there
    flag.touch()
    launched = time.time() - 5  # a request written after the launch (Slurm's warning during start-up) stays
    assert clear_stale_request(tmp_path, launched) is False and flag.exists()
    os.utime(flag, (launched - 60, launched - 60))  # one from an earlier attempt goes
    assert clear_stale_request(tmp_path, launched) is True and not flag.exists()


def test_the_launch_time_slurm_exports_covers_the_start_up_before_this_process():
    import psutil

    from megatron_lpreg.trainer.launch import launch_started_at

    me = psutil.Process().create_time()
    assert launch_started_at({}, False) == me
    assert launch_started_at({"MLPREG_LAUNCH_TIME": f"{me - 30:.6f}"}, False) == pytest.approx(me - 30)
    assert launch_started_at({"MLPREG_LAUNCH_TIME": f"{me - 7200}"}, False) == me  # a leftover in some shell
    assert launch_started_at({"MLPREG_LAUNCH_TIME": "yesterday"}, False) == me
    assert launch_started_at({}, True) == psutil.Process().parent().create_time()  # torchrun: the agent
