"""The worker forker: a small helper process that imports math-verify once and forks warm scoring workers on request.

This is what :class:`~megatron_lpreg.reward.deadline.DeadlinePool` takes its workers from; it is unrelated to the
rank-forking helper of :mod:`megatron_lpreg.parallel.spawn`. Why not ``multiprocessing``: ``fork`` from the trainer
copies its threads' locks (a forked child can deadlock), and ``spawn``/``forkserver`` re-import the caller's
``__main__`` in every worker (slow, and fatal for unguarded scripts). The forker is started with
``python -m megatron_lpreg.reward.forker_process`` (the process side lives there), is single-threaded, and forks a
warm worker in ~10 ms. Each worker gets its own socket; the forker passes the parent's end back over its control
socket (SCM_RIGHTS). Workers die with the forker (PR_SET_PDEATHSIG) and the forker exits when its parent closes
the control socket, so nothing outlives the trainer.

One forker per trainer process is shared by all deadline pools (:func:`shared_forker`); a process forked from its
creator starts its own.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

PROCESS_MODULE = "megatron_lpreg.reward.forker_process"
"""Run with ``python -m``; nothing here imports it, so it is fresh in the child (no runpy double import)."""


class WorkerForker:
    """Client of one forker process. Thread-safe; :meth:`close` (or process exit) stops it."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        """Start the forker process and wait until it has imported math-verify.

        Raises:
            RuntimeError: it did not report ready within ``start_timeout_s`` seconds.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # the child must import megatron_lpreg exactly as we did, also from a source checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", PROCESS_MODULE, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise RuntimeError(
                f"reward worker forker did not start within {start_timeout_s:.0f}s; "
                f"check that `{sys.executable} -c 'import math_verify'` works"
            )
        self._conn.recv()

    def fork_worker(self, memory_limit_mb: int) -> tuple[int, Connection]:
        """Fork a ready reward worker.

        Args:
            memory_limit_mb: address-space limit for the worker (0 = none).

        Returns:
            (pid, connection): send ``(task_id, fn_path, response, ground_truth)``, receive ``(task_id, result)``;
            send ``None`` to stop it, or SIGKILL the pid.
        """
        with self._lock:
            self._conn.send(("fork", memory_limit_mb))
            pid = self._conn.recv()
            fd = reduction.recv_handle(self._conn)
        return pid, Connection(fd)

    def alive(self) -> bool:
        """Whether the forker process is still running."""
        return self._proc.poll() is None

    def close(self) -> None:
        """Stop the forker; idle workers exit when their pools close, busy ones die with it."""
        try:
            self._conn.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)


_shared: WorkerForker | None = None
_shared_lock = threading.Lock()


def shared_forker() -> WorkerForker:
    """The process-wide worker forker, started on first use (about 1 s, once) and restarted if it died."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.owner_pid != os.getpid() or not _shared.alive():
            # a forker inherited through fork belongs to the parent: leave it alone and start our own
            _shared = WorkerForker()
            atexit.register(_shared.close)
        return _shared
