"""Spread generation chunks over engines by outstanding work; move a failed chunk to another engine.

The built-in counterpart of sglang-router's load balancing, with the two things the trainer needs on top: a chunk
whose engine failed (unreachable, hung, 5xx, malformed answer) is resent once to another engine, and the failed
engine is handed to a recovery callback (a bounded restart) while the others keep working. A refused request
(4xx) fails the call at once: it would fail on every engine.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from megatron_lpreg.rollout.sglang_servers import SGLangError

logger = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")

MAX_MOVES = 1
"""Times one chunk may move to another engine: a hung server costs at most (1 + MAX_MOVES) request timeouts,
which RolloutConfig.validate keeps below the trainer's process-group timeout."""


class LeastLoadedDispatcher(Generic[Job, Result]):
    """Send jobs to the usable engine with the least outstanding rows (at most ``max_inflight`` calls each).

    Args:
        send: ``send(engine, job) -> result``; raises SGLangError on failure.
        size: rows in a job (the load measure).
        recover: ``recover(engine, error) -> usable_again``, called once per engine failure in a worker thread;
            raises SGLangError when the engine cannot be recovered (the whole call then fails with it).
        describe: engine id -> text for error messages (engine, node, log file).
    """

    def __init__(self, send: Callable[[int, Job], Result], size: Callable[[Job], int],
                 recover: Callable[[int, SGLangError], bool], describe: Callable[[int], str],
                 max_inflight: int) -> None:
        self.send, self.size, self.recover, self.describe = send, size, recover, describe
        self.max_inflight = max_inflight

    def run(self, jobs: Sequence[Job], engines: Sequence[int]) -> list[Result]:
        """Results in job order.

        Raises:
            SGLangError: a refused request, a chunk that failed on two engines, an engine that could not be
                recovered, or no engine left.
        """
        results: list[Result | None] = [None] * len(jobs)
        pending: deque[int] = deque(range(len(jobs)))
        moves = [0] * len(jobs)
        avoid: list[set[int]] = [set() for _ in jobs]
        usable = set(engines)
        load = dict.fromkeys(engines, 0)
        inflight = dict.fromkeys(engines, 0)
        epoch = dict.fromkeys(engines, 0)
        futures: dict[Future, tuple[str, int, int, int]] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(engines) * self.max_inflight + len(engines))) as pool:
            while pending or futures:
                self._assign(pool, jobs, pending, avoid, usable, load, inflight, epoch, futures)
                if not futures:
                    raise SGLangError(f"no rollout engine left for {len(pending)} chunk(s); engines: "
                                      + "; ".join(self.describe(k) for k in engines))
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, k, j, at_epoch = futures.pop(future)
                    if kind == "recover":
                        if future.result():  # raises when the engine cannot be recovered
                            usable.add(k)
                        continue
                    load[k] -= self.size(jobs[j])
                    inflight[k] -= 1
                    try:
                        results[j] = future.result()
                    except SGLangError as exc:
                        if not exc.engine_fault:
                            raise
                        if moves[j] >= MAX_MOVES:
                            raise SGLangError(f"a generation chunk failed on {moves[j] + 1} engines, last "
                                              f"{self.describe(k)}: {exc}") from exc
                        moves[j] += 1
                        avoid[j].add(k)
                        pending.appendleft(j)
                        if k in usable and at_epoch == epoch[k]:
                            logger.warning("%s failed (%s); its chunks move to other engines, recovering it",
                                           self.describe(k), exc)
                            usable.discard(k)
                            epoch[k] += 1
                            futures[pool.submit(self.recover, k, exc)] = ("recover", k, -1, epoch[k])
        return results  # type: ignore[return-value]

    def _assign(self, pool, jobs, pending, avoid, usable, load, inflight, epoch, futures) -> None:
        waiting: list[int] = []
        while pending:
            j = pending.popleft()
            free = [k for k in usable if inflight[k] < self.max_inflight]
            candidates = [k for k in free if k not in avoid[j]] or free
            if not candidates:
                waiting.append(j)
                continue
            k = min(candidates, key=lambda e: (load[e], e))
            load[k] += self.size(jobs[j])
            inflight[k] += 1
            futures[pool.submit(self.send, k, jobs[j])] = ("send", k, j, epoch[k])
        pending.extend(waiting)
