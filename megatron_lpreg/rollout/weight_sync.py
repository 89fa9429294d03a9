"""Moving trainer weights to engines and checking them there: buckets, payloads, SGLang's weight-update group,
checksums and the teacher-forced probe with its per-dtype tolerance (shared by every engine).

The trainer side hands an engine a stream of ``(hf_name, tensor)`` pairs (``models.bridge`` converts Megatron
TP/PP shards to HF names one tensor at a time); nothing here needs the whole model in memory at once: the stream
is cut into buckets of about ``bucket_bytes`` and each bucket is sent before the next one is produced.
"""
from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_lpreg.parallel.collectives import broadcast_in_group
from megatron_lpreg.rollout.base import LogprobProbe, NamedTensor, WeightSyncError

logger = logging.getLogger(__name__)

CHECKSUM_RTOL = 1e-9
"""Allowed difference of two float64 checksums of the same tensor, relative to max(1, scale) where scale is the
tensor's float64 sum of absolute values (or |expected| where that is not known): identical float32 tensors differ
only by the rounding of the summation order."""


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


PROBE_ATOL = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 1e-1}
"""Largest allowed |engine - trainer| log-prob on the post-sync probe, by the coarser dtype of the two sides.

float32: both sides compute in fp32 and differ by summation order only (1e-6 on the tiny models against the
stand-in, 2e-6 against vLLM); 1e-3 leaves a wide margin. bfloat16 / float16: different kernels rounding to 8 (10)
mantissa bits: measured up to 3e-2 on the tiny models (vLLM bf16) and 1e-2 (real SGLang bf16 on CPU against
transformers fp32); a 64-layer model accumulates more, so 0.1. A weight that was not installed, or installed under
the wrong name, moves these log-probs by O(1) (a zeroed final norm: every log-prob becomes -ln(vocab)); a stale
copy one small RL step old may pass (that is what ``rollout/logprob_mismatch`` watches during training)."""


def probe_atol(*dtypes: str) -> float:
    """:data:`PROBE_ATOL` of the coarsest of ``dtypes`` (torch names, with or without ``torch.``).

    Raises:
        ValueError: a dtype with no tolerance (the message lists the known ones).
    """
    names = [str(d).removeprefix("torch.") for d in dtypes]
    unknown = [n for n in names if n not in PROBE_ATOL]
    if unknown:
        raise ValueError(f"no weight-sync probe tolerance for dtype {unknown[0]!r}; known: {sorted(PROBE_ATOL)}")
    return max(PROBE_ATOL[n] for n in names)


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
