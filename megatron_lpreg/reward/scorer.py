"""The one scoring entry: :class:`RewardScorer` scores responses with the configured reward under a hard deadline.

reward/ is layered one way. At the bottom, pure functions of text and their records (``boxed``, ``math``,
``exact``, ``records``, ``plugin``); the names of the reward functions (``registry``); the worker pool with its
hard per-sample deadline (``forker``, ``deadline``), which runs any function given by path; and this module on
top, which resolves ``reward.name``, decides the cheap cases in-process and sends the rest to the pool.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from megatron_lpreg.config.data import RewardConfig
from megatron_lpreg.reward.deadline import DeadlinePool
from megatron_lpreg.reward.records import RewardResult
from megatron_lpreg.reward.registry import precheck_for, resolve_reward

logger = logging.getLogger(__name__)


class RewardScorer:
    """Scores batches of responses with the configured reward; keeps its deadline workers between batches.

    Workers start at the first sample the in-process fast path cannot decide, so a scorer whose samples are all
    cheap (no box, plain numbers) never starts a process. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        """
        Args:
            cfg: the ``reward.*`` config.

        Raises:
            ValueError: unknown reward name or bad timeout/worker count (naming the reward.* field).
        """
        try:
            self.fn_path = resolve_reward(cfg.name)
        except ValueError as exc:
            raise ValueError(f"reward.name: {exc}") from exc
        cfg.validate()
        self.cfg = cfg
        self._precheck = precheck_for(cfg.name)
        self._pool: DeadlinePool | None = None
        self._closed = False
        self._lock = threading.Lock()

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``, each under the ``reward.timeout_s`` deadline.

        Args:
            responses: model outputs (decoded text).
            ground_truths: one reference answer per response.

        Returns:
            One result per response, in order (``float(result)`` is the score).

        Raises:
            ValueError: the two lists differ in length.
            RuntimeError: called after :meth:`close`.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        results: list[RewardResult | None] = [None] * len(responses)
        if self._precheck is not None:
            results = [self._precheck(r, g) for r, g in zip(responses, ground_truths)]
        todo = [i for i, res in enumerate(results) if res is None]
        if todo:
            done = self._workers().map(self.fn_path, [(responses[i], ground_truths[i]) for i in todo])
            for i, res in zip(todo, done):
                results[i] = res
        return [res for res in results if res is not None]

    def _workers(self) -> DeadlinePool:
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer.score called after close()")
            if self._pool is None:
                self._pool = DeadlinePool(num_workers=self.cfg.num_workers, timeout_s=self.cfg.timeout_s,
                                          memory_limit_mb=self.cfg.memory_limit_mb)
            return self._pool

    def close(self) -> None:
        """Stop the workers (if any started); the scorer cannot be used afterwards."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_reward(cfg: RewardConfig) -> RewardScorer:
    """The scorer for ``cfg`` (close it when done; its workers are forked by the reward worker forker)."""
    return RewardScorer(cfg)


def score(response: str, ground_truth: str, timeout: float = 5.0) -> float:
    """1.0 if the last \\boxed{} of ``response`` equals ``ground_truth`` (the ``math`` reward), else 0.0.

    A one-sample :class:`RewardScorer` with one worker, for scripts and tests; the trainer keeps a scorer open.
    Safe from any thread. Hard cases run in a worker process that is killed after ``timeout`` seconds (a hung
    parse scores 0). Forking the worker adds ~0.02 s (plus ~1 s once per process while the worker forker starts)
    on top of ``timeout``; cheap cases return in microseconds without any process.

    Args:
        response: model output.
        ground_truth: reference answer.
        timeout: per-sample deadline in seconds (> 0).

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: timeout <= 0.
    """
    return score_with_reason(response, ground_truth, timeout=timeout).score


def score_with_reason(response: str, ground_truth: str, timeout: float = 5.0) -> RewardResult:
    """Like :func:`score` but returns the full :class:`RewardResult` (reason, extracted answer, time)."""
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    with RewardScorer(RewardConfig(name="math", timeout_s=timeout, num_workers=1)) as scorer:
        return scorer.score([response], [ground_truth])[0]
