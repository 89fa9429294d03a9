"""A simulated accelerator for CPU tests: catches tensors that our code builds on the host (the default device)
where the rank's device was meant, before a GPU run finds them.

On a GPU node ``ctx.device`` is ``cuda:LOCAL_RANK`` and a tensor built without ``device=`` lands on the CPU: NCCL
refuses it, and the model refuses it as input. A CPU run cannot see that, because there the rank's device *is*
the CPU. This module makes the two tell-apart-able in a CPU process:

- The rank's context says ``ctx.device = cuda:0`` (:data:`RANK_DEVICE`); the CPU shim (``parallel/cpu.py``) maps
  every ``cuda`` request to the CPU, so everything still computes, bit for bit as before.
- :class:`DeviceDisciplineMode`, entered *above* the shim, tags every tensor that code in ``megatron_lpreg``
  creates on the host (no ``device=``, or an explicit CPU device) and follows the tags through torch ops the way
  devices propagate on a GPU (host op host -> host; ``.to(cuda)`` -> device; ``.cpu()`` -> host). Our code's reads
  of ``tensor.device`` / ``is_cuda`` answer what a GPU run would see, so ``device=x.device`` idioms stay correct.
- It raises :class:`DeviceViolation` where CUDA would fail: an op mixing a host tensor (not a 0-dim scalar) with a
  device tensor (e.g. host token ids into the model's embedding), a device tensor turned into numpy, and, via
  :func:`checked_collectives`, a host tensor handed to a torch.distributed collective (what NCCL refuses).

megatron-core and torch internals are trusted: only tensors created from our package's frames are tagged.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

RANK_DEVICE = torch.device("cuda", 0)
"""What the checked rank's ``ctx.device`` says (computed on the CPU through the shim)."""
HOST = torch.device("cpu")
_MARK = "_lpreg_on_host"
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE = "megatron_lpreg."

_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.asarray, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
    torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices,
}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
         torch.randint_like, torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones,
         torch.Tensor.new_empty, torch.Tensor.new_full}
_HOST_ONLY = {torch.from_numpy, torch.frombuffer}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}
"""Cross-device on CUDA too: indexing a CUDA tensor with CPU indices, assigning/copying CPU values into it."""
_DEVICE_GETTERS = {torch.Tensor.device, torch.Tensor.is_cuda, torch.Tensor.is_cpu}


class DeviceViolation(AssertionError):
    """A tensor is on the host where a GPU run needs it on the rank's device (the message says where)."""


def on_host(t: torch.Tensor) -> bool:
    """True when ``t`` is tagged as built on the host by our code (or derived only from such tensors)."""
    return bool(t.__dict__.get(_MARK, False))


def _tag(value: Any, host: bool) -> None:
    for t in tree_leaves(value):
        if isinstance(t, torch.Tensor):
            t.__dict__[_MARK] = host


def _caller() -> tuple[str, int, str] | None:
    """(module, line, file) of the first frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        if not file.startswith(_TORCH_DIR) and file != __file__:
            return frame.f_globals.get("__name__", ""), frame.f_lineno, file
        frame = frame.f_back
    return None


def _ours(caller: tuple[str, int, str] | None, packages: tuple[str, ...]) -> bool:
    return caller is not None and caller[0].startswith(packages)


def _where(caller: tuple[str, int, str] | None) -> str:
    return f"{caller[0]}:{caller[1]}" if caller else "<unknown>"


def _is_accelerator(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _move_target(func: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """(names a device?, is it the accelerator / the tensor it copies) for Tensor.to/.cuda/.cpu."""
    if func is torch.Tensor.cuda:
        return True, True
    if func is torch.Tensor.cpu:
        return True, False
    if "device" in kwargs and kwargs["device"] is not None:
        return True, _is_accelerator(kwargs["device"])
    if len(args) > 1:
        first = args[1]
        if isinstance(first, torch.Tensor):
            return True, not on_host(first)
        if isinstance(first, (str, torch.device)) or (isinstance(first, int) and not isinstance(first, bool)):
            return True, _is_accelerator(first)
    return False, None


class DeviceDisciplineMode(TorchFunctionMode):
    """Tags host tensors made by our code and raises where CUDA would (see the module docstring).

    Args:
        packages: module-name prefixes whose tensor creations are tagged (default: the megatron_lpreg package).
    """

    def __init__(self, packages: tuple[str, ...] = (_PACKAGE,)) -> None:
        super().__init__()
        self.packages = packages

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        kwargs = kwargs or {}
        descriptor = getattr(func, "__self__", None)
        if getattr(func, "__name__", "") == "__get__" and descriptor in _DEVICE_GETTERS:
            caller = _caller()
            if _ours(caller, self.packages):
                host = on_host(args[0])
                if descriptor is torch.Tensor.device:
                    return HOST if host else RANK_DEVICE
                return host if descriptor is torch.Tensor.is_cpu else not host
            return func(*args, **kwargs)
        if func in _FACTORIES or func in _LIKE or func in _HOST_ONLY:
            return self._factory(func, args, kwargs)
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and not on_host(args[0]) and _ours(caller := _caller(), self.packages):
            raise DeviceViolation(f"{_where(caller)}: .numpy() of a tensor on the rank's device (needs .cpu())")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host_in = [t for t in tensors if on_host(t)]
        if host_in and len(host_in) < len(tensors) and func not in _MIXING_ALLOWED:
            big = [tuple(t.shape) for t in host_in if t.dim() > 0]
            if big:
                raise DeviceViolation(
                    f"{_where(_caller())}: {getattr(func, '__name__', func)} mixes host tensor(s) of shape {big} "
                    f"with tensors on the rank's device (build them with collectives.tensor/on_device(x, ctx)); "
                    f"called from {_package_frames()}")
        result = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:
            _tag(result, on_host(args[0]))
        elif host_in and len(host_in) == len(tensors):
            _tag(result, True)
        return result

    def _factory(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        result = func(*args, **kwargs)
        caller = _caller()
        if not _ours(caller, self.packages):
            return result  # megatron / torch internals are trusted: untagged = on the device
        device = kwargs.get("device")
        if func in _HOST_ONLY:
            host = True
        elif device is not None:
            host = not _is_accelerator(device)
        elif func in _LIKE or (func in (torch.as_tensor, torch.asarray) and isinstance(args[0], torch.Tensor)):
            host = on_host(args[0])
        else:
            host = True  # the default device: the CPU on a GPU node
        _tag(result, host)
        return result

    def _move(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        names_device, accelerator = _move_target(func, args, kwargs)
        result = func(*args, **kwargs)
        if not names_device:
            if result is not args[0]:
                _tag(result, on_host(args[0]))
            return result
        host = not accelerator
        if not accelerator and not _ours(_caller(), self.packages):
            host = on_host(args[0])  # torch/megatron moving to the CPU for their own use (e.g. gloo buffers)
        if result is args[0] and on_host(args[0]) != host:
            result = result.clone()  # a real device change makes a new tensor; never retag the caller's one
        _tag(result, host)
        return result


def _package_frames(limit: int = 4) -> str:
    """The innermost ``limit`` frames of our package, innermost first (where a bad tensor came from)."""
    out, frame = [], sys._getframe(1)
    while frame is not None and len(out) < limit:
        name = frame.f_globals.get("__name__", "")
        if name.startswith(_PACKAGE):
            out.append(f"{name}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(out) or "<no megatron_lpreg frame>"


def _check_collective_args(name: str, args: tuple, kwargs: dict) -> None:
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and on_host(t):
            raise DeviceViolation(f"host tensor of shape {tuple(t.shape)} entered torch.distributed.{name} (NCCL "
                                  f"accepts only tensors on the rank's device); called from {_package_frames()}")


_CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
            "gather", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor", "send", "recv")
# (isend/irecv stay unwrapped: P2POp checks their identity; our code calls neither, megatron's p2p moves its own)


def install_checked_collectives() -> Callable[[], None]:
    """From now on every torch.distributed tensor collective refuses host-tagged tensors; returns the undo."""
    originals = {name: getattr(dist, name) for name in _CHECKED}

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _check_collective_args(name, args, kwargs)
            return fn(*args, **kwargs)
        return checked

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))

    def restore() -> None:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return restore


@contextlib.contextmanager
def checked_collectives() -> Iterator[None]:
    """Within the block, every torch.distributed tensor collective refuses host-tagged tensors."""
    restore = install_checked_collectives()
    try:
        yield
    finally:
        restore()


def enter_device_discipline(packages: tuple[str, ...] = (_PACKAGE,)) -> None:
    """Enter :class:`DeviceDisciplineMode` for the rest of this thread and check collectives for the rest of the
    process (for forked rank processes; call it after ``init_parallel`` entered the CPU shim's mode, so this mode
    sees every call first)."""
    DeviceDisciplineMode(packages).__enter__()
    install_checked_collectives()
