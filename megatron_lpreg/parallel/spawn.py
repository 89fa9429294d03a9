"""Fork-ranks harness: run a function on N gloo ranks forked from this (already imported) process.

``torchrun`` costs 13-18 s per launch on a 2-core machine, almost all of it imports; forking a parent that has
already imported torch and megatron starts a 2-rank job in under a second. Used by tests, benchmarks and the
``local`` launcher. Each job gets a fresh free port, so jobs can run back to back in one process.

Fork safety: once a process has run multi-threaded torch ops, GNU OpenMP's thread pool does not survive a
fork, and a child that enters a parallel region hangs for ever (measured here: a parent that ran ``x.exp()``
on 1M elements, a forked child doing the same never returns). :func:`start_zygote` therefore forks a clean
helper process *before* the parent computes anything; rank processes are then forked from that helper, never
from the (threaded) parent. Call it right after the heavy imports (tests/conftest.py, the CLI entry points).
Without a zygote, ranks are forked from the caller directly (fine for a caller that has not run torch ops).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RankFailure(RuntimeError):
    """One or more forked ranks raised; the message holds every failing rank's traceback."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    conn: Any,
    args: tuple,
    kwargs: dict,
    timeout_s: float,
    threads: int,
) -> None:
    status: tuple[str, Any]
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:  # forked by the zygote, which ignores it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        )
        from megatron_lpreg import telemetry

        telemetry.set_rank(rank, world_size)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args, **kwargs)
        status = ("ok", result)
    except BaseException as exc:  # report everything, including SystemExit/KeyboardInterrupt, to the parent
        status = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        conn.send_bytes(pickle.dumps(status))
    except Exception as exc:  # an unpicklable result is a bug in the caller's fn: say so
        conn.send_bytes(pickle.dumps(("error", f"rank {rank}: result not picklable: {exc}")))
    finally:
        conn.close()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)


class _Zygote:
    """A process forked before any torch computation; it forks rank processes on request."""

    def __init__(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe(duplex=True)
        # Not a daemon: daemonic processes may not fork children. atexit stops it (registered after
        # multiprocessing's own exit hook, so it runs first and that hook finds nothing to join).
        self.proc = ctx.Process(target=_zygote_main, args=(child,), daemon=False, name="lpreg-zygote")
        self.proc.start()
        child.close()
        atexit.register(self.stop)
        self.lock = threading.Lock()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.close()
            self.proc.join(timeout=2)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def run(self, request: bytes, timeout_s: float) -> tuple[list[Any], list[str]]:
        with self.lock:
            self.conn.send_bytes(request)
            if not self.conn.poll(timeout_s + 30.0):
                raise RankFailure(f"fork helper gave no answer within {timeout_s + 30:.0f} s")
            return pickle.loads(self.conn.recv_bytes())


_ZYGOTE: _Zygote | None = None
_CANNOT_LOAD = "cannot-load"


def start_zygote() -> None:
    """Fork the clean rank-forking helper now (idempotent). Call before this process runs torch compute."""
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = _Zygote()


def stop_zygote() -> None:
    global _ZYGOTE
    if _ZYGOTE is not None:
        _ZYGOTE.stop()
        _ZYGOTE = None


def _fork_and_collect(fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict, timeout_s: float,
                      threads: int) -> tuple[list[Any], list[str]]:
    """Fork the ranks from this process, wait for them; return (results, errors)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, child_conn, args, kwargs, timeout_s, threads),
            daemon=False,
        )
        proc.start()
        child_conn.close()
        procs.append(proc)
        conns.append(parent_conn)
    results: list[Any] = [None] * world_size
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    pending = dict(zip(conns, range(world_size)))
    while pending and not errors:
        remaining = deadline - time.monotonic()
        ready = mp_connection.wait(list(pending), timeout=max(0.0, remaining))
        if not ready:
            errors.extend(f"rank {r}: no result within {timeout_s:.0f} s (timeout or hang)" for r in pending.values())
            break
        for conn in ready:
            rank = pending.pop(conn)
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(timeout=5)
                kind, payload = "error", f"rank {rank}: died without a result (exit code {procs[rank].exitcode})"
            if kind == "ok":
                results[rank] = payload
            else:
                errors.append(payload)
    for proc in procs:
        proc.join(timeout=0 if errors else max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return results, errors


def _zygote_main(conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    # ... and TERM: Slurm sends it to every process of the step at the time limit; the ranks checkpoint on it
    # (trainer/signals.py) and report their exit code through us, so we must outlive them (ranks get TERM back)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        try:
            try:
                fn, world_size, args, kwargs, timeout_s, threads, env, path = pickle.loads(request)
            except (AttributeError, ImportError) as exc:  # defined after we were forked: the caller forks itself
                conn.send_bytes(pickle.dumps(_CANNOT_LOAD))
                logger.debug("fork helper cannot load the job (%s)", exc)
                continue
            os.environ.clear()
            os.environ.update(env)
            sys.path[:] = path
            answer = _fork_and_collect(fn, world_size, args, kwargs, timeout_s, threads)
        except BaseException as exc:  # unpicklable request etc.: report, keep serving
            answer = ([], [f"fork helper: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"])
        try:
            conn.send_bytes(pickle.dumps(answer))
        except Exception as exc:
            conn.send_bytes(pickle.dumps(([], [f"fork helper: result not picklable: {exc}"])))


def _pickle_job(job: tuple, *, by_value: bool) -> bytes | None:
    """Pickle by reference when possible; by value (cloudpickle, shipped with Ray) for closures, lambdas and a
    script's own functions, which did not exist when the zygote was forked. None if neither works."""
    if not by_value:
        try:
            return pickle.dumps(job)
        except (pickle.PicklingError, AttributeError, TypeError):
            pass
    try:
        from ray import cloudpickle

        return cloudpickle.dumps(job)
    except Exception as exc:  # e.g. an unpicklable argument: fall back to forking from this process
        logger.debug("run_ranks: job not picklable (%s); forking from this process", exc)
        return None


def cores_for_this_job(env: dict[str, str] | None = None) -> int:
    """CPU cores this process may use: ``OMP_NUM_THREADS`` when set, else Slurm's ``SLURM_CPUS_PER_TASK``, else the
    CPUs in this process's affinity mask (never ``os.cpu_count()``, which counts the whole node: a 1-CPU array task
    on a 2-core machine then ran 2 spinning OpenMP threads, and two such tasks slowed each other's steps from
    0.35 s to 5-11 s, measured 2026-12-07)."""
    env = os.environ if env is None else env
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_ranks(
    fn: Callable[..., T],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    threads_per_rank: int | None = None,
    **kwargs: Any,
) -> list[T]:
    """Fork ``world_size`` ranks, init gloo on each, return ``[fn(rank, world_size, *args, **kwargs) ...]``.

    Args:
        fn: called in each child after ``torch.distributed`` (gloo, default group = all ranks) is initialized.
            Must be defined at module level or be a closure; its result must be picklable.
        world_size: number of ranks.
        timeout_s: whole-job deadline; children still running are killed and RankFailure is raised.
        threads_per_rank: torch intra-op threads per child (default: :func:`cores_for_this_job` // world_size, at
            least 1).

    Raises:
        RankFailure: if any rank raised, died, or the job timed out (message has each rank's traceback).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    threads = threads_per_rank or max(1, cores_for_this_job() // world_size)
    request = None
    if _ZYGOTE is not None and _ZYGOTE.alive():
        job = (fn, world_size, args, kwargs, timeout_s, threads, dict(os.environ), list(sys.path))
        request = _pickle_job(job, by_value=getattr(fn, "__module__", "") == "__main__")
    answer = _ZYGOTE.run(request, timeout_s) if request is not None else _CANNOT_LOAD
    if answer != _CANNOT_LOAD:
        results, errors = answer
    else:
        results, errors = _fork_and_collect(fn, world_size, args, kwargs, timeout_s, threads)
    if errors:
        raise RankFailure("\n".join(errors))
    return results
