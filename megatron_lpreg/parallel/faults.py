"""Test-only fault injection: kill this process at a named point of a checkpoint save, or after a delay.

``MLPREG_FAULT`` (unset outside tests; then every call is one dictionary lookup) holds one of:

- ``<point>`` or ``<point>@<step>``: SIGKILL this process when a save reaches ``<point>`` (for the checkpoint
  of step ``<step>`` only, if given). The points of a save, in order (:data:`SAVE_POINTS`):
  ``temp_written`` (model/optimizer shards in the hidden temp dir), ``rng_written`` (every rank's RNG file in the
  temp dir), ``manifest_written`` (rank 0: checksums written, the temp dir is complete), ``renamed`` (the temp
  dir is ``step_N``), ``pointer_written`` (``latest`` names ``step_N``), ``pruned`` (old checkpoints removed);
- ``after:<seconds>``: SIGKILL this process that many seconds after :func:`arm_timer` (a rank's start), a kill
  at an arbitrary moment.

SIGKILL, not an exception: nothing runs after it (no ``finally``, no atexit, no flush), as with the OOM killer
or a Slurm job killed past its grace time. The trainer's forked launcher then ends the other ranks.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

ENV = "MLPREG_FAULT"
SAVE_POINTS = ("temp_written", "rng_written", "manifest_written", "renamed", "pointer_written", "pruned")


def _die(reason: str) -> None:
    # Straight to the file descriptor: a logging handler could hold a lock the killed thread never releases.
    os.write(sys.stderr.fileno(), f"{ENV}: killing pid {os.getpid()} {reason}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(point: str, *, step: int | None = None) -> None:
    """Kill this process here if ``MLPREG_FAULT`` names ``point`` (and ``step``, when the spec has one).

    Raises:
        ValueError: ``point`` is not one of :data:`SAVE_POINTS` (a typo in the caller).
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    if point not in SAVE_POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(SAVE_POINTS)}")
    name, _, at_step = spec.partition("@")
    if name == point and (not at_step or (step is not None and int(at_step) == step)):
        _die(f"at save point {point} (step {step})")


def arm_timer() -> None:
    """With ``MLPREG_FAULT=after:<seconds>``, start a daemon timer that kills this process after that delay.

    Raises:
        ValueError: ``MLPREG_FAULT`` is neither empty, a save point, nor ``after:<seconds>``.
    """
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    if not spec.startswith("after:"):
        if spec.partition("@")[0] not in SAVE_POINTS:
            raise ValueError(f"{ENV}={spec!r}: expected <point>[@<step>] with a point in {SAVE_POINTS}, "
                             f"or after:<seconds>")
        return
    try:
        delay = float(spec[len("after:"):])
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: after:<seconds> needs a number") from None
    timer = threading.Timer(delay, _die, args=(f"{delay:.2f} s after start",))
    timer.daemon = True
    timer.start()
    logger.warning("%s=%s: this process will be killed in %.2f s (fault-injection test)", ENV, spec, delay)
