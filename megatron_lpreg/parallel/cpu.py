"""The one CPU/gloo compatibility layer that lets megatron-core run, multi-rank, on machines without CUDA.

megatron-core assumes CUDA in a few dozen places (docs/models.md, "Parallel bootstrap and the CPU shim").
Two pieces bridge them, and both are inert on a CUDA machine:

1. :func:`install_cpu_shim` — process-wide, idempotent, refuses to act when CUDA is present:
   ``torch.cuda.current_device()`` returns the CPU device, ``torch.cuda.synchronize`` and ``Tensor.cuda()`` are
   no-ops, and megatron's CUDA RNG tracker is replaced by one that forks/restores the CPU generator per region.
2. :class:`CpuDeviceMode` — a ``TorchFunctionMode`` that rewrites ``device="cuda"`` (or a CUDA index) to CPU in
   every torch call, turns ``pin_memory=True`` off, and answers ``Tensor.type()`` with the ``torch.cuda.*`` name
   that megatron's optimizer checks compare against. Torch function modes are per thread, so every rank process
   (and any extra thread) that calls megatron must enter it: :func:`enter_cpu_mode` (stays on) or the
   :func:`cpu_mode` context manager.

:func:`megatron_lpreg.parallel.bootstrap.init_parallel` calls both; library code never needs to.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
_installed = False
_thread_state = threading.local()


def cuda_available() -> bool:
    """True when a CUDA device is usable (then nothing in this module changes anything)."""
    return torch.cuda.is_available()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means a CUDA index in torch's factory functions and Tensor.to.
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (what megatron's param.type() checks expect)."""
    name = torch.Tensor.type(tensor)
    return name if ".cuda." in name or tensor.is_sparse else name.replace("torch.", "torch.cuda.", 1)


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU inside megatron-core (see module docstring).

    Only device placement changes; values and dtypes are untouched, so numerics equal a plain CPU run.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        if func is torch.Tensor.type and len(args) == 2 and isinstance(args[1], str) and ".cuda." in args[1]:
            args = (args[0], args[1].replace("torch.cuda.", "torch.", 1))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            # Tensor.to(device[, dtype]) passes the device positionally (a dtype or tensor is not a device).
            args = (args[0], CPU, *args[2:])
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_in_mode(func, args, kwargs)
        return func(*args, **kwargs)


def _backward_in_mode(func: Any, args: tuple, kwargs: dict) -> None:
    """Run autograd's engine with a CpuDeviceMode active, so custom ``backward``s are rewritten too.

    A mode is popped while its own handler runs, and ``torch.autograd.backward`` re-dispatches to the mode if
    one is active, so the engine is called directly (torch 2.13 internals; on other versions, if they moved,
    the plain call runs without the mode, which only matters for backward code that names "cuda" literally).
    """
    autograd = torch.autograd
    engine_run = getattr(autograd.graph, "_engine_run_backward", None)
    if engine_run is None or not hasattr(autograd, "_make_grads"):
        return func(*args, **kwargs)
    if func is torch.Tensor.backward:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
        bound = dict(zip(names, args), **{("grad_tensors" if k == "gradient" else k): v for k, v in kwargs.items()})
    else:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        bound = dict(zip(names, args), **kwargs)
    tensors = bound["tensors"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = bound.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    create_graph = bool(bound.get("create_graph", False))
    retain_graph = bound.get("retain_graph")
    grads = autograd._tensor_or_tensors_to_tuple(bound.get("grad_tensors"), len(tensors))
    grads = autograd._make_grads(tensors, grads, is_grads_batched=False)
    with CpuDeviceMode():
        engine_run(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph, inputs,
                   allow_unreachable=True, accumulate_grad=True)


def enter_cpu_mode() -> bool:
    """Enter :class:`CpuDeviceMode` for the rest of this thread's life (idempotent per thread).

    Returns:
        True if the mode is active in this thread after the call, False on a CUDA machine (nothing done).
    """
    if cuda_available():
        return False
    if not getattr(_thread_state, "mode", None):
        mode = CpuDeviceMode()
        mode.__enter__()
        _thread_state.mode = mode
    return True


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """Context manager form of :func:`enter_cpu_mode` (no-op on CUDA machines or if already active)."""
    if cuda_available() or getattr(_thread_state, "mode", None):
        yield
        return
    with CpuDeviceMode():
        yield


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    base = getattr(mrandom, "_LPREG_ORIGINAL_TRACKER", mrandom.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):  # subclass so megatron's isinstance checks still hold
        """megatron's RNG tracker with each named state held as a CPU generator state.

        ``fork(name)`` swaps the CPU default generator to the named state for the region and restores the
        previous state afterwards, which is what the CUDA tracker does with the CUDA generator.
        """

        def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False) -> None:
            if use_cudagraphable_rng:
                raise ValueError("use_cudagraphable_rng=True needs CUDA graphs; it cannot be used on CPU")
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} already exists (tracker name {name!r})")
            if name in self.states_:
                raise ValueError(f"RNG tracker state {name!r} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise ValueError(f"RNG tracker state {name!r} was never added (call model_parallel_cuda_manual_seed)")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def install_cpu_shim() -> bool:
    """Patch torch.cuda and megatron-core for CPU-only use, once per process.

    Returns:
        True if the shim is installed (now or before), False on a CUDA machine, where nothing is patched.
    """
    global _installed
    if cuda_available():
        logger.debug("CUDA present: CPU shim not installed")
        return False
    if _installed:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, memory_format=None: self

    mrandom._LPREG_ORIGINAL_TRACKER = mrandom.CudaRNGStatesTracker
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker_class()
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    # A tracker built before the shim would be the CUDA one: drop it so the next use builds the CPU tracker.
    mrandom.initialize_rng_tracker(force_reset=True)
    _installed = True
    logger.info("no CUDA: installed the megatron-core CPU shim (gloo, local layer spec)")
    return True


def cpu_shim_installed() -> bool:
    """Whether :func:`install_cpu_shim` has patched this process."""
    return _installed
