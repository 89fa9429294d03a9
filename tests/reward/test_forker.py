"""The reward worker forker outlives the (short-lived) thread that started it, and workers die with their pool."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from megatron_lpreg.reward.deadline import DeadlinePool
from megatron_lpreg.reward.forker import PROCESS_MODULE, WorkerForker, shared_forker
from megatron_lpreg.reward.math import MATH_REWARD_PATH


def _alive(pid: int) -> bool:
    """The process runs (a zombie is dead: a worker orphaned by its forker's death waits to be reaped by whichever
    process adopted it, which need not be quick about it)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_forker_survives_its_starting_thread_and_cleans_up():
    holder: dict[str, WorkerForker] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("f", WorkerForker()))
    thread.start()
    thread.join()
    forker = holder["f"]
    time.sleep(0.2)
    assert forker.alive()
    pool = DeadlinePool(num_workers=2, timeout_s=5.0, forker=forker)
    pids = [w.pid for w in pool._workers]
    assert pool.map(MATH_REWARD_PATH, [("\\boxed{1/2}", "0.5"), ("\\boxed{3}", "4")])[0].score == 1.0
    pool.close()
    forker.close()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids) and not forker.alive()


def test_pool_survives_the_death_of_the_shared_forker():
    with DeadlinePool(num_workers=1, timeout_s=0.5) as pool:
        forker = shared_forker()
        forker._proc.kill()
        forker._proc.wait()
        worker_pid = pool._workers[0].pid
        deadline = time.monotonic() + 5
        while _alive(worker_pid) and time.monotonic() < deadline:  # workers die with their forker
            time.sleep(0.05)
        assert not _alive(worker_pid)
        # the dead worker is noticed at dispatch and replaced from a new forker; the sample is not lost
        results = pool.map(MATH_REWARD_PATH, [("\\boxed{10^{10^{10^{10}}}}", "5"), ("\\boxed{1/2}", "0.5")])
    assert [r.reason for r in results] == ["timeout", "verified"]
    assert shared_forker() is not forker and shared_forker().alive()


def test_forker_and_workers_outlive_the_term_slurm_sends_every_process_at_the_time_limit():
    import signal

    forker = WorkerForker()
    with DeadlinePool(num_workers=1, timeout_s=5.0, forker=forker) as pool:
        pids = [forker._proc.pid, pool._workers[0].pid]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        assert all(_alive(p) for p in pids)
        assert pool._workers[0].pid == pids[1]  # the same worker scores: nothing was replaced
        assert pool.map(MATH_REWARD_PATH, [("\\boxed{1/2}", "0.5")])[0].reason == "verified"
    forker.close()
    assert not forker.alive()


def _start_raw_forker():
    import socket
    import subprocess
    import sys
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", PROCESS_MODULE, str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    theirs.close()
    return proc, Connection(ours.detach())


def test_forker_whose_parent_dies_during_start_up_exits_quietly():
    """D8: a rank that fails at start-up closes the control socket before the forker is ready; the forker must
    exit without a stray BrokenPipeError traceback on the job's stderr."""
    proc, conn = _start_raw_forker()
    conn.close()  # the parent is gone before the forker has imported math-verify
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 0


def test_forker_whose_parent_dies_during_a_fork_request_exits_quietly():
    proc, conn = _start_raw_forker()
    assert conn.recv()[0] == "ready"
    conn.send(("fork", 0))
    conn.close()  # the parent dies before it reads the worker's pid
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 0
