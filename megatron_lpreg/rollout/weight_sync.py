"""Moving trainer weights to engines and checking them there: buckets, payloads, a standalone broadcast group,
spot checks and the teacher-forced probe (shared by every engine).

The trainer side hands an engine a stream of ``(hf_name, tensor)`` pairs (``models.bridge`` converts Megatron
TP/PP shards to HF names one tensor at a time); nothing here needs the whole model in memory at once: the stream
is cut into buckets of about ``bucket_bytes`` and each bucket is sent before the next one is produced.
"""
from __future__ import annotations

import base64
import datetime
import itertools
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lpreg.parallel.collectives import broadcast_in_group
from megatron_lpreg.rollout.base import LogprobProbe, NamedTensor, WeightSyncError

logger = logging.getLogger(__name__)

CHECKSUM_RTOL = 1e-9
"""Allowed difference of two float64 checksums of the same tensor, relative to max(1, scale) where scale is the
tensor's float64 sum of absolute values (or |expected| where that is not known): identical float32 tensors differ
only by the rounding of the summation order."""
SAMPLE_ELEMENTS = 64
"""Elements of each tensor's first row kept for the post-sync spot check (cheap for any model size)."""


def iter_buckets(tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group a tensor stream into lists of at most ~``bucket_bytes`` (a larger tensor is a bucket of its own)."""
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def checksum(tensor: torch.Tensor, *, absolute: bool = False, rounded_to: torch.dtype | None = None,
             block_elements: int = 1 << 22) -> float:
    """The float64 sum of ``tensor``: what ``WeightUpdate.checksums`` holds and engines compare after a sync.

    Summed in blocks of about ``block_elements`` along the first dimension, so the float64 temporaries are one block
    (32 MiB by default), never the whole tensor: ``tensor.double().sum()`` and ``tensor.sum(dtype=torch.float64)``
    both materialise a float64 copy first (measured with torch's CPU memory profiler; a 6.2 GB temporary for the
    32B model's embedding). One host sync per call.

    Args:
        tensor: any shape, dtype and device.
        absolute: sum ``|tensor|`` instead (the scale :func:`checksum_matches` takes).
        rounded_to: cast each block to this dtype first: the sum of the tensor as an engine storing that dtype
            holds it.
        block_elements: elements per float64 block (a row longer than this is one block).
    """
    flat = tensor.detach()
    if flat.dim() == 0 or flat.shape[0] == 0:
        flat = flat.reshape(-1)
    rows_per_block = max(1, block_elements // max(1, flat[0].numel())) if flat.numel() else 1
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for block in flat.split(rows_per_block, dim=0):
        if rounded_to is not None:
            block = block.to(rounded_to)
        total += (block.abs() if absolute else block).sum(dtype=torch.float64)
    return float(total)


def checksum_matches(actual: float, expected: float, scale: float | None = None) -> bool:
    """Whether two checksums agree within :data:`CHECKSUM_RTOL` (``scale`` defaults to ``|expected|``)."""
    return abs(actual - expected) <= CHECKSUM_RTOL * max(1.0, abs(expected) if scale is None else scale)


def serialize_named_tensors(tensors: list[NamedTensor]) -> str:
    """Base64 payload for SGLang's ``/update_weights_from_tensor`` (``serialized_named_tensors`` entries).

    CUDA tensors go through ``ForkingPickler`` (CUDA IPC handles: the engine must be on the same node, as in
    SGLang's own colocated mode); CPU tensors are pickled inline (self-contained bytes). SGLang deserialises
    both with its ``MultiprocessingSerializer``.
    """
    if any(t.is_cuda for _, t in tensors):
        import io

        from torch.multiprocessing.reductions import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(tensors)
        raw = buf.getvalue()
    else:
        raw = pickle.dumps([(name, t.detach().contiguous()) for name, t in tensors])
    return base64.b64encode(raw).decode("ascii")


GROUP_NAME_PREFIX = "lpreg_weight_sync"
"""Start of every weight-update group name (:func:`new_group_name`); SGLang keys its groups by this name."""
_group_serial = itertools.count()


def new_group_name() -> str:
    """A group name not used before by this process: torch refuses a second live group of the same name, and
    the store keys of an old group (``<name>/...``) must not be read by a new one after an engine restart."""
    return f"{GROUP_NAME_PREFIX}_{os.getpid()}_{next(_group_serial)}"


def standalone_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0, *,
    group_name: str = GROUP_NAME_PREFIX,
) -> dist.ProcessGroup:
    """Rank ``rank`` (the trainer: 0) of a process group that SGLang's TP ranks join, outside the default group.

    Built as SGLang builds its side of ``/init_weights_update_group`` (``init_custom_process_group`` in
    sglang 0.5.23 ``srt/utils/common.py:2859``, called by ``weight_updater.py:133`` with
    ``init_method=tcp://master_address:master_port``, ``rank = rank_offset + tp_rank`` and the request's
    ``group_name``): torch's ``rendezvous(tcp://host:port)`` (rank 0 hosts the TCP store), ``PrefixStore(group_name,
    store)``, then torch's ``_new_process_group_helper`` under ``group_name``, which prefixes the keys once more.
    Any other store layout waits on keys the engine never writes (``DistStoreError: wait timeout``). The group is
    registered in torch's group registry under ``group_name``; free it with :func:`destroy_group` before a new group
    of the same name, and give every new group a new name (:func:`new_group_name`).

    Raises:
        ValueError: unknown backend.
    """
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"rollout.weight_sync_backend={backend!r} must be 'nccl' or 'gloo'")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), dist.PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {r: r for r in range(world_size)}  # group rank == rank inside the group
    return group


def destroy_group(group: dist.ProcessGroup | None) -> None:
    """Free a group made by :func:`standalone_group` (its name becomes usable again); None is a no-op."""
    if group is not None:
        dist.destroy_process_group(group)


def broadcast_bucket(group: dist.ProcessGroup, tensors: list[NamedTensor], backend: str) -> None:
    """Broadcast each tensor of ``tensors`` from rank 0 of ``group``, in order."""
    for _, tensor in tensors:
        payload = tensor.detach().contiguous()
        if backend == "nccl" and not payload.is_cuda:
            payload = payload.cuda()
        broadcast_in_group(group, payload, root=0)


def first_row_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The first ``SAMPLE_ELEMENTS`` elements of ``tensor[:1]`` as float32 on CPU (what the spot check compares)."""
    return tensor.detach()[:1].reshape(-1)[:SAMPLE_ELEMENTS].float().cpu()


@dataclass
class WeightSamples:
    """First-row samples of the tensors sent in one sync, to compare with what each engine reports afterwards."""

    samples: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, tensors: Iterable[NamedTensor]) -> None:
        for name, tensor in tensors:
            self.samples[name] = first_row_sample(tensor)

    def pick(self, count: int) -> list[str]:
        """``count`` names spread evenly over the stream order (first and last included)."""
        names = list(self.samples)
        if count <= 0 or not names:
            return []
        if count >= len(names):
            return names
        step = (len(names) - 1) / (count - 1) if count > 1 else 0
        return list(dict.fromkeys(names[round(k * step)] for k in range(count)))

    def check(self, name: str, engine_rows: torch.Tensor, *, engine: str) -> None:
        """Compare an engine's ``weight[:1]`` with the sample; exact up to the engine's own dtype rounding.

        Raises:
            WeightSyncError: the engine holds different values (stale or corrupted weights).
        """
        expected = self.samples[name]
        actual = engine_rows.reshape(-1)[:SAMPLE_ELEMENTS].float()
        if actual.shape != expected.shape:
            raise WeightSyncError(
                f"{engine}: weight '{name}' sample shape {tuple(actual.shape)} != sent {tuple(expected.shape)}"
            )
        # the engine may store bf16/fp16 while the trainer sent fp32: accept exactly those roundings, nothing looser
        candidates = (expected, expected.bfloat16().float(), expected.half().float())
        if not any(torch.equal(actual, c) for c in candidates):
            diff = (actual - expected).abs().max().item()
            raise WeightSyncError(
                f"{engine}: weight '{name}' differs from what was sent (max |diff| {diff:.3g}); the engine did not "
                f"install this update"
            )


def verify_probe(score_fn: Callable[[list[int], int], list[float]], probe: LogprobProbe, *, engine: str) -> float:
    """Score ``probe`` with ``score_fn(token_ids, prompt_len)`` and compare with its expected log-probs.

    Args:
        score_fn: the engine's teacher-forced scorer (temperature 1) of ``token_ids[prompt_len:]``.
        probe: what the trainer scored with the weights it just sent.
        engine: name for messages.

    Returns:
        The largest absolute log-prob difference.

    Raises:
        WeightSyncError: length mismatch or a difference above ``probe.atol``.
    """
    actual = score_fn(list(probe.token_ids), probe.prompt_len)
    if len(actual) != len(probe.expected_logprobs):
        raise WeightSyncError(
            f"{engine}: probe returned {len(actual)} log-probs, expected {len(probe.expected_logprobs)}"
        )
    max_diff = max(abs(a - e) for a, e in zip(actual, probe.expected_logprobs))
    if max_diff > probe.atol:
        raise WeightSyncError(
            f"{engine}: probe log-probs differ from the trainer's by {max_diff:.3g} > atol={probe.atol:g}; the "
            f"engine is not serving the weights just sent"
        )
    logger.info("%s: weight-sync probe ok (max |dlogp| = %.3g)", engine, max_diff)
    return max_diff
