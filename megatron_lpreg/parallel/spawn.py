"""Fork-ranks harness: run a function on N gloo ranks forked from this (already imported) process.

``torchrun`` costs 13-18 s per launch on a 2-core machine, almost all of it imports; forking a parent that has
already imported torch and megatron starts a 2-rank job in under a second. Used by tests, benchmarks and the
``local`` launcher. Each job gets a fresh free port, so jobs can run back to back in one process.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RankFailure(RuntimeError):
    """One or more forked ranks raised; the message holds every failing rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
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
    try:
        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        )
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
        threads_per_rank: torch intra-op threads per child (default: cores // world_size, at least 1).

    Raises:
        RankFailure: if any rank raised, died, or the job timed out (message has each rank's traceback).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("fork")
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
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
    if errors:
        raise RankFailure("\n".join(errors))
    return results
