"""The process side of :mod:`megatron_lpreg.reward.forker`: the forker's request loop and each scoring worker's loop.

Started as ``python -m megatron_lpreg.reward.forker_process <control fd>`` by ``forker.WorkerForker``; nothing in
the package imports it. The forker imports the reward modules and math-verify once, warms sympy up, then forks
one worker per request; a worker loads reward functions by path (the plug-in contract of
:mod:`megatron_lpreg.reward.plugin`) and scores one ``(response, ground_truth)`` at a time until told to stop.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from megatron_lpreg.reward.plugin import as_result, load_callable
from megatron_lpreg.reward.records import RewardResult

logger = logging.getLogger(__name__)

PRELOAD_MODULES = ("megatron_lpreg.reward.math", "megatron_lpreg.reward.exact")
"""Imported once in the forker so that every worker starts warm."""


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the forker) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _worker_loop(conn: Connection, memory_limit_mb: int) -> None:
    """Receive (task_id, fn_path, response, ground_truth), reply (task_id, RewardResult), until None or EOF."""
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fns: dict[str, Callable[..., Any]] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, fn_path, response, ground_truth = msg
        start = time.monotonic()
        try:
            if fn_path not in fns:
                fns[fn_path] = load_callable(fn_path)
            result = as_result(fns[fn_path](response, ground_truth))
        except Exception as exc:  # MemoryError and RecursionError included: the sample fails, the worker lives
            result = RewardResult(score=0.0, reason="error", detail=f"{type(exc).__name__}: {exc}"[:500])
        conn.send((task_id, replace(result, seconds=time.monotonic() - start)))


def _serve(control_fd: int) -> None:
    """Import math-verify, report ready, then fork a worker per request until the parent closes the socket.

    A parent that dies first (a rank failing at start-up, before or during a request) is the normal way a forker
    ends: the broken control socket ends the loop quietly, with exit code 0 and no traceback on the job's stderr.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer owns shutdown
    # TERM too (workers inherit it): Slurm sends it to every process of the step at the time limit, and the trainer
    # then finishes its step and checkpoints; we end on EOF of the control socket, workers by SIGKILL
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    # no PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and callers may be short-lived
    # threads; we exit on EOF of the control socket instead, which happens when the owning process dies
    conn = Connection(control_fd)
    for name in PRELOAD_MODULES:
        importlib.import_module(name)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we disable its timeouts on purpose
    from math_verify import parse, verify

    # pay sympy's lazy imports here, not inside the first sample's deadline
    warm = [parse(text, parsing_timeout=None) for text in ("\\boxed{1/2}", "\\boxed{0.5}")]
    verify(*warm, timeout_seconds=None)
    try:
        conn.send(("ready", os.getpid()))
        _serve_requests(conn)
    except (EOFError, OSError):  # BrokenPipeError, ConnectionResetError: the parent is gone
        return


def _serve_requests(conn: Connection) -> None:
    """Fork one worker per ``("fork", memory_limit_mb)`` request; return on ``None`` or EOF.

    Raises:
        OSError: the parent closed the control socket while we replied (the caller treats it as EOF).
    """
    while True:
        msg = conn.recv()
        if msg is None:
            return
        _, memory_limit_mb = msg
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # worker
            code = 0
            try:
                conn.close()
                ours.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # user reward functions may run subprocesses
                _die_with_parent()
                _worker_loop(Connection(theirs.detach()), memory_limit_mb)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        try:
            conn.send(pid)
            reduction.send_handle(conn, ours.fileno(), os.getppid())
        finally:
            ours.close()  # on failure the worker sees EOF and exits (it also dies with us)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
