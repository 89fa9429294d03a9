"""The built-in dispatcher without HTTP: least outstanding work wins, a failed chunk moves once to another engine,
the failed engine is recovered once (not per chunk), refusals and unrecoverable engines fail the call."""
from __future__ import annotations

import threading

import pytest

from megatron_lpreg.rollout.dispatch import LeastLoadedDispatcher
from megatron_lpreg.rollout.sglang_servers import SGLangError


def _dispatcher(send, recover=lambda k, e: False, inflight=1) -> LeastLoadedDispatcher:
    return LeastLoadedDispatcher(send=send, size=lambda job: job[1], recover=recover,
                                 describe=lambda k: f"engine {k}", max_inflight=inflight)


def test_a_slow_engine_gets_less_work():
    served: dict[int, int] = {0: 0, 1: 0}
    lock = threading.Lock()
    engine1_busy = threading.Event()

    def send(k, job):
        if k == 0:  # engine 0 is slow: its first chunk finishes only after engine 1 served 8
            engine1_busy.wait(timeout=60)
        with lock:
            served[k] += 1
            if served[1] >= 8:
                engine1_busy.set()
        return (k, job[0])

    results = _dispatcher(send).run([(j, 1) for j in range(12)], [0, 1])
    assert [r[1] for r in results] == list(range(12))  # results in job order
    assert served[1] > served[0] >= 1


def test_failed_chunks_move_and_the_engine_is_recovered_once():
    recovered = []

    def send(k, job):
        if k == 1:
            raise SGLangError("connection refused")
        return k

    def recover(k, error):
        recovered.append(k)
        return False

    results = _dispatcher(send, recover, inflight=2).run([(j, 1) for j in range(6)], [0, 1, 2])
    assert 1 not in results and len(results) == 6
    assert recovered == [1]


def test_refused_requests_and_unrecoverable_engines_fail_the_call():
    def refuse(k, job):
        raise SGLangError("HTTP 400: bad key", engine_fault=False)

    with pytest.raises(SGLangError, match="HTTP 400"):
        _dispatcher(refuse).run([(0, 1)], [0, 1])

    def broken(k, job):
        raise SGLangError("gone")

    def cannot(k, error):
        raise SGLangError(f"engine {k} failed after 2 restart(s)")

    with pytest.raises(SGLangError, match=r"failed after 2 restart|failed on 2 engines"):
        _dispatcher(broken, cannot).run([(0, 1), (1, 1)], [0, 1])


def test_chunks_keep_prompt_groups_whole_and_reach_every_engine():
    from megatron_lpreg.rollout.sglang import chunk_rows

    # 16 prompts x 4 samples over 4 engines: 4 prompt groups (16 rows) per engine, not one 64-row chunk
    assert chunk_rows(16, 4, 4, 256) == 16
    assert chunk_rows(16, 4, 4, 8) == 8  # max_batch_size still caps a chunk
    assert chunk_rows(3, 8, 2, 256) == 16  # uneven split: ceil(3 / 2) groups
    assert chunk_rows(1, 8, 4, 256) == 8  # fewer prompts than engines: one group per chunk
    assert chunk_rows(5, 2, 0, 256) == 10  # no usable engine reported: one chunk (the dispatcher raises)
