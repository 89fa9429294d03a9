"""The fork-ranks harness: results, errors with tracebacks, timeouts, and fork safety after the parent has used
torch's OpenMP pool (the reason for the zygote)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lpreg.parallel.spawn import RankFailure, run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()
    return rank


def _hang(rank, world):
    import time

    time.sleep(60)


def _threaded_work(rank, world):
    x = torch.randn(2_000_000)
    return float(x.exp().sum() > 0) + float((torch.randn(256, 256) @ torch.randn(256, 256)).abs().sum() > 0)


def test_results_in_rank_order():
    assert run_ranks(_sum_ranks, 3) == [6.0, 6.0, 6.0]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankFailure, match="rank 1: ValueError: boom on purpose"):
        run_ranks(_fail_on_rank_one, 2, timeout_s=60)


def test_timeout_kills_the_job():
    with pytest.raises(RankFailure, match="no result within 2 s"):
        run_ranks(_hang, 2, timeout_s=2)


def test_ranks_run_threaded_torch_after_the_parent_did():
    torch.randn(2_000_000).exp().sum()  # the parent's OpenMP pool is now live
    for threads in (1, 2):
        assert run_ranks(_threaded_work, 1, threads_per_rank=threads, timeout_s=60) == [2.0]


def test_closures_still_work():
    offset = 5
    assert run_ranks(lambda rank, world: rank + offset, 2) == [5, 6]


def test_closures_with_threaded_torch_after_the_parent_used_openmp():
    torch.randn(2_000_000).exp().sum()
    size = 2_000_000
    assert run_ranks(lambda rank, world: float(torch.randn(size).exp().sum() > 0), 2, timeout_s=60) == [1.0, 1.0]


def _term_the_zygote(rank, world):
    """Slurm's TERM at the time limit reaches every process of the step: here the zygote (our parent) and us."""
    import os
    import signal

    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a rank is stoppable by TERM again
    os.kill(os.getppid(), signal.SIGTERM)
    return default


def test_the_zygote_outlives_term_so_the_ranks_results_come_back():
    from megatron_lpreg.parallel import spawn

    assert spawn._ZYGOTE is not None and spawn._ZYGOTE.alive()  # tests/conftest.py started it
    assert run_ranks(_term_the_zygote, 1, timeout_s=60) == [True]
    assert spawn._ZYGOTE.alive()


def _threads(rank, world):
    return torch.get_num_threads()


def test_ranks_take_this_job_s_cores_not_the_node_s(monkeypatch):
    """A Slurm task with --cpus-per-task=1 on a bigger node gets 1 thread per rank, whatever os.cpu_count() says."""
    import os

    from megatron_lpreg.parallel.spawn import cores_for_this_job

    assert cores_for_this_job({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}) == 3
    assert cores_for_this_job({"SLURM_CPUS_PER_TASK": "8"}) == 8
    assert cores_for_this_job({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "0"}) == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert run_ranks(_threads, 1, timeout_s=60) == [1]
