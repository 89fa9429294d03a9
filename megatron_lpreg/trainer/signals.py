"""Preemption: SIGUSR1/SIGTERM -> checkpoint at the next step boundary -> exit with REQUEUE_EXIT_CODE.

Slurm delivers ``--signal=B:USR1@<sec>`` to the batch shell, which forwards it to the trainer process; with Ray
or forked ranks the signal reaches only that process, so the request is also made visible through a file in the
run directory (``PREEMPT_FILE``) that rank 0 polls. All ranks then agree through one all-reduce, save together
and exit; slurm/train.sbatch turns the exit code into ``scontrol requeue``.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 42
"""Exit status meaning "checkpointed on a preemption signal; requeue me" (see slurm/train.sbatch)."""
PREEMPT_FILE = ".preempt_requested"


class PreemptionWatcher:
    """Turns signals (this process) or the run-dir flag file (any process) into a collective stop decision."""

    def __init__(self, run_dir: str | Path, *, install_handlers: bool = True) -> None:
        self.flag_path = Path(run_dir) / PREEMPT_FILE
        self._signalled = False
        if install_handlers:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                try:
                    signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread (e.g. inside a Ray actor thread): file path only
                    pass

    def _on_signal(self, signum: int, frame: object) -> None:
        logger.warning("received %s: will checkpoint and exit at the end of this step",
                       signal.Signals(signum).name)
        self._signalled = True
        request_preemption(self.flag_path.parent)

    def should_stop(self) -> bool:
        """True on every rank if any rank saw a signal or the flag file exists (collective when distributed)."""
        local = self._signalled or self.flag_path.exists()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def clear(self) -> None:
        self.flag_path.unlink(missing_ok=True)


def request_preemption(run_dir: str | Path) -> None:
    """Ask a running trainer (any launcher) to checkpoint and exit with REQUEUE_EXIT_CODE."""
    path = Path(run_dir) / PREEMPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def forward_signals_to_run_dir(run_dir: str | Path) -> None:
    """In a launcher process: turn SIGUSR1/SIGTERM into the run dir's preemption flag (ranks poll it)."""

    def handler(signum: int, frame: object) -> None:
        logger.warning("launcher received %s: asking the ranks to checkpoint and exit",
                       signal.Signals(signum).name)
        request_preemption(run_dir)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
