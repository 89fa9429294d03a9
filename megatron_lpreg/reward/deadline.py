"""A process pool whose every sample has a hard deadline: a worker still busy when its sample's time is up is
killed (SIGKILL) and replaced, and the sample scores 0 with reason ``timeout``. Nothing a reward function does
(hang in C code, recurse, eat memory up to the limit) can block the caller past the deadline.

Workers are forked by the reward worker forker (:mod:`megatron_lpreg.reward.forker`), so a replacement is ready
in ~10 ms, they never inherit the trainer's threads or CUDA state, and pools may be used from any thread. The pool
runs any reward function given by path; which function a reward name means is :mod:`megatron_lpreg.reward.registry`'s
business, and :class:`megatron_lpreg.reward.scorer.RewardScorer` puts the two together.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from megatron_lpreg.reward.forker import WorkerForker, shared_forker
from megatron_lpreg.reward.records import RewardResult

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    pid: int
    conn: Connection
    task: int | None = None
    started_at: float = 0.0


class DeadlinePool:
    """Worker processes that score (response, ground_truth) pairs, each within ``timeout_s`` seconds.

    Use as a context manager or call :meth:`close`. ``map`` calls are serialised by a lock.
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 4096,
        forker: WorkerForker | None = None,
    ) -> None:
        """
        Args:
            num_workers: worker processes (>= 1).
            timeout_s: per-sample deadline, counted from when a worker receives the sample.
            memory_limit_mb: address-space limit per worker (0 = none); going over fails that sample.
            forker: where workers are forked from; default the process-wide :func:`shared_forker`.

        Raises:
            ValueError: num_workers < 1 or timeout_s <= 0.
        """
        if num_workers < 1:
            raise ValueError(f"reward.num_workers={num_workers} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be > 0 seconds")
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.killed = 0
        """Workers killed so far for running past a deadline."""
        self._uses_shared_forker = forker is None
        self._forker = forker or shared_forker()
        self._lock = threading.Lock()
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        if self._uses_shared_forker and not self._forker.alive():
            logger.warning("the reward worker forker died; starting a new one")
            self._forker = shared_forker()
        pid, conn = self._forker.fork_worker(self.memory_limit_mb)
        return _Worker(pid=pid, conn=conn)

    def _replace(self, worker: _Worker) -> None:
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def map(self, fn_path: str, items: Sequence[tuple[str, str]]) -> list[RewardResult]:
        """Score ``items`` with the function at ``fn_path`` (``'pkg.module:fn'``), each under the deadline.

        Args:
            fn_path: importable reward function ``fn(response, ground_truth) -> float | (float, reason) |
                RewardResult``.
            items: (response, ground_truth) pairs.

        Returns:
            One result per item, in order; hung samples get reason ``timeout``, crashed ones ``error``.
        """
        with self._lock:
            if not self._workers:
                raise RuntimeError("DeadlinePool.map called after close()")
            return self._map_locked(fn_path, items)

    def _map_locked(self, fn_path: str, items: Sequence[tuple[str, str]]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(items)
        queue = deque(range(len(items)))
        while queue or any(w.task is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.task is None and queue:
                    self._dispatch(worker, queue, fn_path, items)
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                continue
            next_due = min(w.started_at for w in busy) + self.timeout_s
            for conn in wait([w.conn for w in busy], timeout=max(0.0, next_due - time.monotonic())):
                self._receive(next(w for w in self._workers if w.conn is conn), results)
            self._enforce_deadlines(results)
        return [r for r in results if r is not None]

    def _dispatch(self, worker: _Worker, queue: deque, fn_path: str, items: Sequence[tuple[str, str]]) -> None:
        index = queue.popleft()
        response, ground_truth = items[index]
        worker.task, worker.started_at = index, time.monotonic()
        try:
            # a megabyte response fills the socket buffer; the worker is idle and reading, so this returns
            worker.conn.send((index, fn_path, response, ground_truth))
        except OSError:
            logger.warning("reward worker %d died while idle; replacing it", worker.pid)
            worker.task = None
            queue.appendleft(index)
            self._replace(worker)

    def _receive(self, worker: _Worker, results: list[RewardResult | None]) -> None:
        try:
            task_id, result = worker.conn.recv()
        except (EOFError, OSError):
            detail = "reward worker died (a crash, or the memory limit)"
            logger.warning("%s on sample %s", detail, worker.task)
            if worker.task is not None:
                results[worker.task] = RewardResult(score=0.0, reason="error", detail=detail)
            self._replace(worker)
            return
        results[task_id] = result
        worker.task = None

    def _enforce_deadlines(self, results: list[RewardResult | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now - worker.started_at >= self.timeout_s:
                results[worker.task] = RewardResult(score=0.0, reason="timeout", seconds=now - worker.started_at)
                self.killed += 1
                self._replace(worker)

    def close(self) -> None:
        """Stop all workers (idle ones exit on their own; busy ones are killed)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            if worker.task is not None:
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
