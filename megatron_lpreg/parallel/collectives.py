"""The one place where tensors are put on the rank's device and handed to ``torch.distributed`` collectives.

NCCL accepts only CUDA tensors, and a tensor built without ``device=`` lands on the *default* device (the CPU),
so every tensor that enters a collective or the model must be placed explicitly on ``ctx.device``
(:class:`~megatron_lpreg.parallel.bootstrap.ParallelContext`: ``cuda:LOCAL_RANK`` with CUDA, ``cpu`` without).
Code outside ``ops/`` and this module builds such tensors with :func:`tensor` / :func:`zeros` / :func:`on_device`
and communicates through the wrappers below, never through raw ``torch.distributed`` calls
(``tests/parallel/test_device_discipline.py`` enforces both).

Ranks (``src``/``dst``) are *global* ranks, as in ``torch.distributed``; :func:`global_rank` converts a rank
inside a group. Object collectives pickle through tensors that torch itself places on the group's device.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ReduceOpName = Literal["sum", "max", "min", "prod", "avg"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "prod": dist.ReduceOp.PRODUCT, "avg": dist.ReduceOp.AVG}


class HasDevice(Protocol):
    """Anything that names the rank's device (a ParallelContext)."""

    @property
    def device(self) -> torch.device: ...


# ---- placement --------------------------------------------------------------------------------------------
def on_device(x: torch.Tensor, ctx: HasDevice, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` on the rank's device (and ``dtype`` if given); no copy when it already is."""
    return x.to(device=ctx.device, dtype=dtype)


def tensor(data: Any, ctx: HasDevice, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` built directly on the rank's device."""
    return torch.tensor(data, dtype=dtype, device=ctx.device)


def zeros(shape: int | Sequence[int], ctx: HasDevice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero tensor of ``shape`` on the rank's device."""
    return torch.zeros(shape, dtype=dtype, device=ctx.device)


def empty(shape: int | Sequence[int], ctx: HasDevice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` on the rank's device (a receive buffer)."""
    return torch.empty(shape, dtype=dtype, device=ctx.device)


def arange(end: int, ctx: HasDevice, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``torch.arange(end)`` on the rank's device (e.g. position ids)."""
    return torch.arange(end, dtype=dtype, device=ctx.device)


# ---- process-group facts ----------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True when a default process group exists (collectives would communicate)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Size of ``group`` (default: world); 1 when torch.distributed is not initialized."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: world); 0 when torch.distributed is not initialized."""
    return dist.get_rank(group) if is_distributed() else 0


def global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group_rank`` inside ``group``."""
    return dist.get_global_rank(group, group_rank)


def _backend(group: Any) -> str:
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):  # a group built outside the default registry (weight-sync groups)
        name = getattr(group, "name", None)
        return str(name()) if callable(name) else ""


def _check_placed(name: str, tensor_: torch.Tensor, group: Any) -> None:
    """Refuse tensors no backend can move, with the fix in the message (NCCL's own error names neither)."""
    if tensor_.device.type == "meta":
        raise ValueError(f"{name}: tensor is on the meta device (built on the default device?); "
                         f"place it with collectives.tensor/on_device(x, ctx)")
    if _backend(group) == "nccl" and tensor_.device.type != "cuda":
        raise ValueError(f"{name}: NCCL group got a {tensor_.device} tensor of shape {tuple(tensor_.shape)}; "
                         f"build it on ctx.device with collectives.tensor/zeros/on_device")


# ---- tensor collectives (in place, return the tensor) -----------------------------------------------------
def all_reduce(tensor_: torch.Tensor, *, op: ReduceOpName = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``tensor_`` in place over ``group`` (a no-op when not distributed); returns it."""
    if not is_distributed():
        return tensor_
    _check_placed("all_reduce", tensor_, group)
    dist.all_reduce(tensor_, op=_OPS[op], group=group)
    return tensor_


def broadcast(tensor_: torch.Tensor, *, src: int, group: Any = None) -> torch.Tensor:
    """Overwrite ``tensor_`` with global rank ``src``'s copy on every rank of ``group``; returns it."""
    if not is_distributed():
        return tensor_
    _check_placed("broadcast", tensor_, group)
    dist.broadcast(tensor_, src=src, group=group)
    return tensor_


def all_gather(tensor_: torch.Tensor, *, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor_`` (same shape on all ranks), in group-rank order."""
    if not is_distributed():
        return [tensor_]
    _check_placed("all_gather", tensor_, group)
    out = [torch.empty_like(tensor_) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor_.contiguous(), group=group)
    return out


def all_gather_into_tensor(output: torch.Tensor, tensor_: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor_`` along dim 0 into ``output`` (world x shape); returns ``output``."""
    if not is_distributed():
        return output.copy_(tensor_)
    _check_placed("all_gather_into_tensor", tensor_, group)
    _check_placed("all_gather_into_tensor", output, group)
    dist.all_gather_into_tensor(output, tensor_.contiguous(), group=group)
    return output


def gather(tensor_: torch.Tensor, *, dst: int, group: Any = None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor_`` on global rank ``dst`` (group-rank order); None on the other ranks."""
    if not is_distributed():
        return [tensor_]
    _check_placed("gather", tensor_, group)
    receives = dist.get_rank() == dst
    out = [torch.empty_like(tensor_) for _ in range(dist.get_world_size(group))] if receives else None
    dist.gather(tensor_.contiguous(), out, dst=dst, group=group)
    return out


def send(tensor_: torch.Tensor, *, dst: int, group: Any = None) -> None:
    """Point-to-point send to global rank ``dst``."""
    _check_placed("send", tensor_, group)
    dist.send(tensor_.contiguous(), dst=dst, group=group)


def recv(tensor_: torch.Tensor, *, src: int, group: Any = None) -> torch.Tensor:
    """Receive into ``tensor_`` from global rank ``src``; returns it."""
    _check_placed("recv", tensor_, group)
    dist.recv(tensor_, src=src, group=group)
    return tensor_


def broadcast_in_group(group: Any, tensor_: torch.Tensor, *, root: int = 0) -> torch.Tensor:
    """Broadcast ``tensor_`` from ``root`` (a rank *inside* ``group``) over a ProcessGroup object built outside
    torch.distributed's registry (e.g. the trainer -> rollout-engine weight group), where ``dist.broadcast``
    cannot resolve ranks; returns the tensor (in place on receivers)."""
    _check_placed("broadcast_in_group", tensor_, group)
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor_], opts).wait()
    return tensor_


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group`` (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier(group=group)


# ---- object collectives (pickled; torch places the byte tensors on the group's device) --------------------
def broadcast_object(obj: Any, *, src: int = 0, group: Any = None) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group`` (``obj`` is ignored elsewhere)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, *, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in group-rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def send_object(obj: Any, *, dst: int, group: Any = None) -> None:
    """Send one picklable object to global rank ``dst``."""
    dist.send_object_list([obj], dst=dst, group=group)


def recv_object(*, src: int, group: Any = None) -> Any:
    """Receive one object sent with :func:`send_object` from global rank ``src``."""
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


def gather_object(obj: Any, *, dst: int = 0, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` on global rank ``dst`` (group-rank order); None on the other ranks."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
