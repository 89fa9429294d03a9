"""Stop before the job's time limit: checkpoint and exit with the requeue code while a save still fits.

Slurm's USR1 warning comes a fixed time before the end and is seen only between steps; a 32B step (8-12 min) and
its save (~460 GB) can overrun it. Instead every rank learns the job's end time once (``SLURM_JOB_END_TIME``,
epoch seconds, set by newer Slurm releases; otherwise one ``squeue -h -j $SLURM_JOB_ID -o %e``, then
``scontrol show job``) and keeps a running estimate of one step and one save. After each step it asks: would the
next step, then a save, then ``trainer.walltime_margin_s`` still end before the end time? When not, the loop saves
now and exits with :data:`~megatron_lpreg.rundir.REQUEUE_EXIT_CODE` (the sbatch script requeues the job).

Estimates are deliberately pessimistic: the step estimate is the longest of the last :data:`WINDOW` steps (step
times grow as responses lengthen), plus the longest held-out evaluation seen when the next step ends with one
(``eval.interval``); the save estimate is the longest save seen, or, before the first save, the time the restore
took to load the checkpoint, or else one step time. Outside Slurm (no end time) nothing ever stops.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime

logger = logging.getLogger(__name__)

END_TIME_VAR = "SLURM_JOB_END_TIME"
"""Epoch seconds at which Slurm ends the job (Slurm >= 23.02 exports it; 22.05 does not)."""
WINDOW = 5
"""Steps the step-time estimate looks back over (their maximum)."""
QUERY_TIMEOUT_S = 20.0
"""How long the one squeue/scontrol query may take before the end time counts as unknown."""

Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    """stdout of ``argv`` ('' when the command is missing, fails or hangs)."""
    if shutil.which(argv[0]) is None:
        return ""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def parse_slurm_time(text: str) -> float | None:
    """Epoch seconds of a Slurm date (``2026-12-07T06:30:00``, local time, as squeue ``%e`` prints it); None
    for ``Unknown``, ``NONE``, ``N/A`` or anything else that is not a date."""
    text = text.strip()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def job_end_time(env: Mapping[str, str] | None = None, run: Runner = _run) -> float | None:
    """The job's end time in epoch seconds: ``SLURM_JOB_END_TIME``, else asked from Slurm once (``squeue``, then
    ``scontrol show job``) when ``SLURM_JOB_ID`` is set; None outside Slurm or without a time limit.

    Raises:
        ValueError: ``SLURM_JOB_END_TIME`` is set but not a number (names the variable and its value).
    """
    env = os.environ if env is None else env
    text = env.get(END_TIME_VAR, "").strip()
    if text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{END_TIME_VAR}={text!r} is not epoch seconds; unset it or give e.g. "
                             f"{END_TIME_VAR}={int(time.time()) + 3600}") from None
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID", "").strip(), env.get("SLURM_ARRAY_TASK_ID", "").strip()
    if array_job.isdigit() and task.isdigit():
        # an array's first task can share its job id with the array, and `squeue -j <array id>` lists every task
        job = f"{array_job}_{task}"
    end = parse_slurm_time(run(["squeue", "-h", "-j", job, "-o", "%e"]).strip().split("\n")[0])
    if end is None:
        match = re.search(r"\bEndTime=(\S+)", run(["scontrol", "-o", "show", "job", job]))
        end = parse_slurm_time(match.group(1)) if match else None
    if end is None:
        logger.warning("Slurm job %s: end time unknown (squeue/scontrol gave none); no stop before the limit", job)
    return end


class WalltimeGuard:
    """Decides, after each step, whether the next step and a save still fit before the end time.

    Args:
        end_time: epoch seconds at which the job ends; None: never stop.
        margin_s: kept free after the save (``trainer.walltime_margin_s``).
        clock: epoch seconds now (tests pass a fake clock).
    """

    def __init__(self, end_time: float | None, margin_s: float, clock: Callable[[], float] = time.time) -> None:
        self.end_time, self.margin_s, self.clock = end_time, margin_s, clock
        self._steps: deque[float] = deque(maxlen=WINDOW)
        self._save_s: float | None = None
        self._load_s: float | None = None
        self._eval_s = 0.0
        self._next = 0.0

    def record_step(self, seconds: float, evaluation_s: float = 0.0) -> None:
        """One step took ``seconds`` (rollout to metrics), then ``evaluation_s`` for a held-out evaluation."""
        self._steps.append(seconds)
        self._eval_s = max(self._eval_s, evaluation_s)

    def record_save(self, seconds: float) -> None:
        """A checkpoint save took ``seconds``."""
        self._save_s = max(seconds, self._save_s or 0.0)

    def record_load(self, seconds: float) -> None:
        """The restore took ``seconds`` to load a checkpoint (the save estimate until a save is measured)."""
        self._load_s = seconds

    def step_estimate(self, evaluates: bool = False) -> float:
        """Seconds the next step is expected to take (0 before any step); ``evaluates``: it ends with a held-out
        evaluation (the longest one seen is added)."""
        return max(self._steps, default=0.0) + (self._eval_s if evaluates else 0.0)

    def save_estimate(self) -> float:
        """Seconds a save is expected to take: the longest measured, else the load time, else one step."""
        if self._save_s is not None:
            return self._save_s
        return self._load_s if self._load_s is not None else self.step_estimate()

    def time_left(self) -> float | None:
        """Seconds until the end time (None: no end time)."""
        return None if self.end_time is None else self.end_time - self.clock()

    def should_stop(self, evaluates: bool = False) -> bool:
        """True when the next step (with its evaluation when ``evaluates``), a save and the margin would end after
        the end time (False without one)."""
        left = self.time_left()
        if left is None:
            return False
        self._next = self.step_estimate(evaluates)
        return self._next + self.save_estimate() + self.margin_s > left

    def reason(self) -> str:
        """Why :meth:`should_stop` said yes, for the log."""
        return (f"the next step (~{self._next:.0f} s) + a save (~{self.save_estimate():.0f} s) + "
                f"trainer.walltime_margin_s={self.margin_s:g} exceed the {self.time_left() or 0:.0f} s left before "
                f"the job's end time")
