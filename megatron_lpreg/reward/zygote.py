"""The reward zygote: a small helper process that imports math-verify once and forks reward workers on request.

Why not ``multiprocessing``: ``fork`` from the trainer copies its threads' locks (a forked child can deadlock),
and ``spawn``/``forkserver`` re-import the caller's ``__main__`` in every worker (slow, and fatal for unguarded
scripts). The zygote is started with ``python -m megatron_lpreg.reward.zygote``, is single-threaded, and forks a
warm worker in ~10 ms. Each worker gets its own socket; the zygote passes the parent's end back over its control
socket (SCM_RIGHTS). Workers die with the zygote (PR_SET_PDEATHSIG) and the zygote exits when its parent closes
the control socket, so nothing outlives the trainer.

One zygote per trainer process is shared by all reward pools (:func:`shared_zygote`), the same way Python's own
forkserver is process-wide; a process forked from its creator starts its own.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Callable

logger = logging.getLogger(__name__)

PRELOAD_MODULES = ("megatron_lpreg.reward.math", "megatron_lpreg.reward.registry")


class Zygote:
    """Client of one zygote process. Thread-safe; :meth:`close` (or process exit) stops it."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        """Start the zygote and wait until it has imported math-verify.

        Raises:
            RuntimeError: it did not report ready within ``start_timeout_s`` seconds.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # the child must import megatron_lpreg exactly as we did, also from a source checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_lpreg.reward.zygote", str(theirs.fileno())],
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
                f"reward zygote did not start within {start_timeout_s:.0f}s; "
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
        return self._proc.poll() is None

    def close(self) -> None:
        """Stop the zygote; idle workers exit when their pools close, busy ones die with it."""
        try:
            self._conn.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)


_shared: Zygote | None = None
_shared_lock = threading.Lock()


def shared_zygote() -> Zygote:
    """The process-wide zygote, started on first use (about 1 s, once) and restarted if it died."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.owner_pid != os.getpid() or not _shared.alive():
            # a zygote inherited through fork belongs to the parent: leave it alone and start our own
            _shared = Zygote()
            atexit.register(_shared.close)
        return _shared


# ---- process side ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the zygote) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _worker_loop(conn: Connection, memory_limit_mb: int) -> None:
    """Receive (task_id, fn_path, response, ground_truth), reply (task_id, RewardResult), until None or EOF."""
    from megatron_lpreg.reward.records import RewardResult, as_result
    from megatron_lpreg.reward.registry import load_callable

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

    A parent that dies first (a rank failing at start-up, before or during a request) is the normal way a zygote
    ends: the broken control socket ends the loop quietly, with exit code 0 and no traceback on the job's stderr.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer owns shutdown
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
