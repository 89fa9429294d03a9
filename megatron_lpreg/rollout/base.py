"""The rollout-engine interface every engine implements (local, sglang, vllm).

Engines take prompt token ids and sampling parameters and return response token ids, the engine's own per-token
sampling log-probs (so the trainer can measure engine/trainer mismatch) and finish reasons.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "abort"]


def finish_reason(raw: str | None) -> FinishReason:
    """An engine's own finish reason in this vocabulary: ``stop`` and ``length`` kept, anything else ``abort``."""
    return raw if raw in ("stop", "length") else "abort"


class Colocation(enum.StrEnum):
    """How an engine shares the trainer's processes and GPUs: the one meaning of "colocated" in this package.

    The value decides what :meth:`RolloutEngine.release_memory` / :meth:`RolloutEngine.resume_memory` do and whether
    weights move after an update. ``rollout.mode`` (``colocated`` / ``separate``) names two of these values.
    """

    EMBEDDED = "embedded"
    """Runs inside each trainer rank's process and generates from the trainer's own parameters (the local engine
    over the Megatron model, parallel.pp == 1): no weights move, no memory of its own to release."""
    COLOCATED = "colocated"
    """Keeps its own weights and KV cache on the GPUs of trainer ranks (SGLang with rollout.mode=colocated, vLLM on
    CUDA in rank 0's process, an engine actor with a fractional GPU): it releases that memory while the trainer
    updates and takes it back before the weight sync."""
    SEPARATE = "separate"
    """Has devices of its own (rollout.mode=separate, whole-GPU engine actors) or runs on CPU with its own copy of
    the weights (the hosted local engine, vLLM on CPU): release/resume are no-ops, weights are synced."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings (the SGLang/vLLM vocabulary)."""

    n: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = off; 1 = greedy."""
    min_p: float = 0.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a response stops after emitting one of these (it is kept in the response)."""
    seed: int | None = None
    """Base seed; response j of prompt i uses a seed derived from (seed, i, j), so results do not depend on
    batching."""


@dataclass(kw_only=True)
class Completion:
    """One generated response."""

    prompt_index: int
    """Index of the prompt in the request batch."""
    sample_index: int
    """0..n-1 within the prompt's group."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    """Engine's log-prob of each response token under the sampling distribution (after temperature)."""
    finish_reason: FinishReason
    text: str = ""
    """Decoded response (filled when the engine has a tokenizer)."""


@dataclass(frozen=True, kw_only=True)
class EngineHealth:
    ok: bool
    detail: str = ""
    weight_version: int = 0


NamedTensor = tuple[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """An engine failed to install new weights, or a post-sync check (spot check, probe log-probs) failed."""


@dataclass(frozen=True, kw_only=True)
class LogprobProbe:
    """A teacher-forced check of an engine's weights after a sync.

    The trainer scores ``token_ids[prompt_len:]`` with its own weights (temperature 1, see
    ``rollout.logits_model.teacher_forced_logprobs``); the engine scores the same tokens after the update and the
    largest absolute difference must stay within ``atol``.
    """

    token_ids: tuple[int, ...]
    prompt_len: int
    expected_logprobs: tuple[float, ...]
    """Trainer's log-probs of ``token_ids[prompt_len:]``."""
    atol: float = 1e-3
    """Allowed max |engine - trainer| log-prob difference (fp32 engines: ~1e-4; bf16 engines need ~5e-2)."""


@dataclass(frozen=True, kw_only=True)
class PayloadBucket:
    """One bucket of a colocated tensor sync, assembled on trainer rank 0: the payload every engine TP rank reads,
    serialized by the trainer rank on that rank's own GPU (``trainer/colocated_sync.py``)."""

    tensors: list[NamedTensor]
    """The bucket as rank 0 holds it (names in payload order); never sent by rank 0 itself."""
    payloads: list[list[str]]
    """``payloads[e][i]``: the ``serialized_named_tensors`` entry of engine ``e``'s TP rank ``i``."""


@dataclass(kw_only=True)
class WeightUpdate:
    """New weights for an engine, in Hugging Face names, streamed one tensor at a time."""

    version: int
    tensors: Iterable[NamedTensor] | None = None
    """(hf_name, tensor) stream; None when the engine shares parameters with the trainer (local) or loads
    from ``path``."""
    path: str | None = None
    """HF checkpoint directory to load from (update_weights_from_disk)."""
    payloads: Iterable[PayloadBucket] | None = None
    """Colocated tensor sync (SGLang): per-bucket payloads, one per engine TP rank, each written by the trainer
    rank on that engine rank's GPU; used instead of ``tensors``."""
    checksums: dict[str, float] = field(default_factory=dict)
    """Optional per-tensor float64 sums to verify after the update; filled only for engines that read them
    (``reads_checksums``: local, vLLM), never for SGLang."""
    probe: LogprobProbe | None = None
    """Optional probe scored by the engine after the update; a mismatch raises WeightSyncError."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    colocation: Colocation
    """Where the engine runs relative to the trainer (see :class:`Colocation`)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate ``params.n`` responses for each prompt; result ordered by (prompt_index, sample_index)."""
        ...

    def update_weights(self, update: WeightUpdate) -> None:
        """Install new weights; raise on a verification mismatch."""
        ...

    def release_memory(self) -> None:
        """Give the engine's device memory (weights, KV cache) back to the trainer before its policy update.

        Called by the trainer on every engine before each update, in order release -> update -> resume ->
        weight sync. Acts only when ``colocation`` is :attr:`Colocation.COLOCATED` (a no-op for embedded and
        separate engines). SGLang: ``/release_memory_occupation``; vLLM: ``sleep``.
        """
        ...

    def resume_memory(self) -> None:
        """Re-allocate what :meth:`release_memory` freed, after the trainer freed its cache and before the weight
        sync (SGLang: ``/resume_memory_occupation``; vLLM: ``wake_up``). A no-op where release is."""
        ...

    def health(self) -> EngineHealth: ...

    def shutdown(self) -> None: ...

