"""Preemption signals: SIGUSR1/SIGTERM -> checkpoint at the next step boundary -> exit with REQUEUE_EXIT_CODE.

Slurm delivers ``--signal=B:USR1@<sec>`` to the batch shell, whose trap (slurm/common.sh) writes the run
directory's preemption flag (:mod:`megatron_lpreg.rundir`, which owns the flag file, the requeue code and
dropping stale requests); a signal sent to a launcher or rank process is turned into the same file here. Rank 0
polls it at every step boundary, all ranks agree through one all-reduce, save together and exit;
slurm/train.sbatch turns the exit code into ``scontrol requeue``. Handlers are installed only while a run trains.
The loop also stops this way on its own when the job's time limit is near (:mod:`megatron_lpreg.trainer.walltime`),
so Slurm's TERM at the limit, handled the same, is the last resort: it saves only if the step ends in time.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_lpreg import rundir

if TYPE_CHECKING:
    from megatron_lpreg.parallel.collectives import HasDevice

logger = logging.getLogger(__name__)


class PreemptionWatcher:
    """Turns signals (this process) or the run-dir flag file (any process) into a collective stop decision."""

    def __init__(self, run_dir: str | Path, *, install_handlers: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self._signalled = False
        self._previous = _install_handler(self._on_signal) if install_handlers else {}

    def close(self) -> None:
        """Give the signals back to the handlers they had before (idempotent)."""
        _restore_handlers(self._previous)
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        logger.warning("received %s: will checkpoint and exit at the end of this step",
                       signal.Signals(signum).name)
        self._signalled = True
        rundir.request_preemption(self.run_dir)

    def should_stop(self, ctx: HasDevice | None = None, *, local: bool = False) -> bool:
        """True on every rank if any rank saw a signal, the flag file exists, or any rank passed ``local=True``
        (collective when distributed).

        Args:
            ctx: names the rank's device, where the flag is reduced (required when distributed).
            local: this rank's own reason to stop (the walltime guard: the next step and a save would not fit).

        Raises:
            ValueError: distributed but no ``ctx``.
        """
        from megatron_lpreg.parallel import collectives as coll

        local = local or self._signalled or rundir.preemption_requested(self.run_dir)
        if coll.world_size() == 1:
            return local
        if ctx is None:
            raise ValueError("PreemptionWatcher.should_stop: pass the ParallelContext (ctx) when distributed")
        return bool(coll.all_reduce(coll.tensor([1.0 if local else 0.0], ctx), op="max").item() > 0)

    def clear(self) -> None:
        """Consume the request (the checkpoint it asked for is written)."""
        rundir.clear_preemption(self.run_dir)


@contextlib.contextmanager
def forward_signals_to_run_dir(run_dir: str | Path) -> Iterator[None]:
    """In a launcher process, while the block runs: SIGUSR1/SIGTERM become the run dir's preemption flag (the
    ranks poll it). The previous handlers are back afterwards, so a signal after the run leaves no flag behind."""

    def handler(signum: int, frame: object) -> None:
        logger.warning("launcher received %s: asking the ranks to checkpoint and exit",
                       signal.Signals(signum).name)
        rundir.request_preemption(run_dir)

    previous = _install_handler(handler)
    try:
        yield
    finally:
        _restore_handlers(previous)


def _install_handler(handler: Callable[[int, object], None]) -> dict[int, Any]:
    """Handle SIGUSR1 and SIGTERM with ``handler``; return the handlers they had (for :func:`_restore_handlers`).
    Off the main thread (e.g. a Ray actor thread) nothing is installed: the flag file still works."""
    previous = {}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:
            pass
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
