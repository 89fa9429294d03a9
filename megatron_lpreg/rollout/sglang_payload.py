"""Tensor payloads for SGLang's ``/update_weights_from_tensor``, in SGLang's own wire format, without importing
SGLang.

What SGLang 0.5.23 does with a payload: each TP rank deserializes only its own entry,
``serialized_named_tensors[tp_rank]`` (``sglang/srt/managers/tp_worker.py:194`` ``deserialize_own_rank``), with
``MultiprocessingSerializer.deserialize`` (``sglang/srt/utils/common.py:3060``: base64 -> ``SafeUnpickler``) after
``monkey_patch_torch_reductions()`` (``sglang/srt/utils/patch_torch.py``). Its own serializer is
``ForkingPickler(buf).dump(obj)`` + base64, one call per TP rank (``entrypoints/engine.py``
``_serialize_tensors_per_rank``: "each rank deserializes only its own copy, so producer-side CUDA-IPC refcounts drop
cleanly"). :func:`serialize_named_tensors` writes the same bytes:

- CUDA tensors become CUDA IPC handles whose device index is replaced by the GPU's UUID, as SGLang's
  ``_reduce_tensor_modified`` does (argument 6 of torch's ``rebuild_cuda_tensor``); the receiving rank maps the
  UUID back to its own index of that GPU, which differs from the sender's when the two processes see different
  ``CUDA_VISIBLE_DEVICES`` (a trainer rank sees one GPU, an engine all of its TP GPUs).
- CPU tensors go through shared memory with torch's ``file_system`` strategy (a named shm segment the receiver
  opens). The default ``file_descriptor`` strategy passes file descriptors over a socket authenticated with the
  sender's key, which a server process rejects (``AuthenticationError``, measured on a real SGLang CPU server,
  shared notes rollout-engines.md).

Every global the payload names is on SGLang's ``SafeUnpickler.ALLOWED_GLOBALS`` list (the tests decode payloads
with SGLang's real deserializer). The sender must keep CUDA tensors alive until every receiver has opened them;
CPU segments are reference-counted by torch (one reference per payload, dropped by the receiver).
"""
from __future__ import annotations

import base64
import contextlib
import io
import threading
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions

from megatron_lpreg.rollout.base import NamedTensor

DEVICE_ARG = 6
"""Position of the device index in torch's ``rebuild_cuda_tensor`` arguments (SGLang's
``_REDUCE_TENSOR_ARG_DEVICE_INDEX``)."""

_SHARING_LOCK = threading.Lock()


def serialize_named_tensors(tensors: list[NamedTensor]) -> str:
    """One ``serialized_named_tensors`` entry (for one engine TP rank): base64 of ``ForkingPickler`` bytes of the
    ``[(name, tensor), ...]`` list, readable by SGLang's ``MultiprocessingSerializer.deserialize``.

    Call once per receiving TP rank: SGLang's ranks each consume (and release) their own payload.
    """
    named = [(name, _sendable(tensor)) for name, tensor in tensors]
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    for cls in (torch.Tensor, torch.nn.Parameter):
        pickler.dispatch_table[cls] = _reduce_tensor
    with _file_system_sharing():
        pickler.dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sendable(tensor: torch.Tensor) -> torch.Tensor:
    """CUDA: the tensor itself (an IPC handle to its memory). CPU: a private copy, since sharing moves a storage
    into shared memory in place and the trainer's own tensors must stay where they are."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        return tensor.contiguous()
    return tensor.clone(memory_format=torch.contiguous_format)


def _reduce_tensor(tensor: torch.Tensor) -> tuple:
    """torch's tensor reduction, with a CUDA tensor's device index replaced by its GPU UUID (SGLang's
    ``monkey_patch_torch_reductions`` does the same on its sending side; its receiving side accepts both)."""
    # torch's own reduction even where SGLang patched it into this process: its patched one indexes argument 6 of
    # every tensor's arguments, which a CPU tensor (3 arguments) does not have
    reduce = getattr(reductions, "_reduce_tensor_original", reductions.reduce_tensor)
    rebuild, args = reduce(tensor)
    if tensor.is_cuda and isinstance(args[DEVICE_ARG], int):
        uuid = str(torch.cuda.get_device_properties(args[DEVICE_ARG]).uuid)
        args = (*args[:DEVICE_ARG], uuid, *args[DEVICE_ARG + 1:])
    return rebuild, args


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """torch's sharing strategy is process-wide: ``file_system`` only while one payload is written."""
    with _SHARING_LOCK:
        before = torch_mp.get_sharing_strategy()
        torch_mp.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            torch_mp.set_sharing_strategy(before)
