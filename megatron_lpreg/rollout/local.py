"""The embedded CPU rollout engine: batched, KV-cached, seeded generation in the trainer's own process.

Shapes: B rows per forward (one row = one (prompt, sample) pair), S left-padded prompt length, V real vocab.

The engine decodes through a :class:`~megatron_lpreg.rollout.logits_model.LogitsModel`: the Megatron adapter
wraps the trainer's GPTModel itself (so generation reads the very parameters the optimizer just stepped; nothing
is copied and ``update_weights`` only bumps the version and runs the optional checks), the HF adapter wraps a
``transformers`` model (evaluation of HF checkpoints, the SGLang stand-in server). With Megatron TP>1 every TP
rank runs this engine in lockstep on the same prompts; logits are all-gathered inside the adapter and the per-row
seeded samplers (``sampling.py``) make every rank draw the same tokens.
"""
from __future__ import annotations

import logging

import torch

from megatron_lpreg.rollout.base import (
    Colocation,
    Completion,
    EngineHealth,
    FinishReason,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
)
from megatron_lpreg.rollout.logits_model import LogitsModel, teacher_forced_logprobs
from megatron_lpreg.rollout.sampling import RowSampler, request_seed, row_seed, sample_rows, validate_params
from megatron_lpreg.rollout.weight_sync import checksum, checksum_matches, verify_probe

logger = logging.getLogger(__name__)

PAD_ID = 0
"""Filler for left padding; masked out, so its value never matters."""


class LocalEngine:
    """In-process engine over a LogitsModel. One ``generate`` call at a time (not thread-safe)."""

    def __init__(
        self,
        model: LogitsModel,
        *,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer: object | None = None,
        max_batch_size: int = 256,
        colocation: Colocation = Colocation.EMBEDDED,
    ) -> None:
        """Args:
            model: the adapter to decode through (shares the caller's parameters).
            eos_token_ids: ids that always end a response (added to each request's ``stop_token_ids``).
            tokenizer: optional HF tokenizer to fill ``Completion.text``.
            max_batch_size: rows (prompt x sample) per forward; larger requests run in chunks.
            colocation: EMBEDDED when ``model`` wraps the caller's own model (the trainer's chunk), SEPARATE when
                the engine loaded a copy of its own (an HF directory); see :class:`~megatron_lpreg.rollout.base.
                Colocation`. The engine holds no device memory of its own either way.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.colocation = colocation
        self.weight_version = 0
        self._closed = False

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate ``params.n`` responses per prompt; see :class:`~megatron_lpreg.rollout.base.RolloutEngine`.

        Raises:
            ValueError: on an empty prompt, bad sampling parameters, or prompt + max_new_tokens beyond the
                model's positions.
        """
        if self._closed:
            raise RuntimeError("LocalEngine.generate() after shutdown()")
        validate_params(params)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) + params.max_new_tokens > self.model.max_length:
                raise ValueError(
                    f"prompt {i}: {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                    f"model's {self.model.max_length} positions; shorten the prompt or lower max_new_tokens"
                )
        seed = request_seed(params)
        rows = sample_rows(len(prompts), params.n)
        completions: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            outputs = self.generate_rows(
                [prompts[i] for i, _ in chunk], params, [row_seed(seed, i, j) for i, j in chunk]
            )
            for (i, j), out in zip(chunk, outputs):
                out.prompt_index, out.sample_index = i, j
                completions.append(out)
        return completions

    def generate_rows(self, row_prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        """Generate one response per row (``params.n`` is ignored): one batch, or one batch per prompt length when
        the model cannot mask left padding (``LogitsModel.masks_padding``; per-row seeds make both the same).

        Args:
            row_prompts: B prompts (repeat a prompt for several samples).
            params: sampling parameters.
            seeds: B per-row seeds (see ``sampling.row_seed``); the SGLang stand-in passes ``sampling_seed`` here.

        Returns:
            B completions with ``prompt_index`` = row and ``sample_index`` = 0.
        """
        if self.model.masks_padding:
            return self._generate_batch(row_prompts, params, seeds)
        by_length: dict[int, list[int]] = {}
        for row, prompt in enumerate(row_prompts):
            by_length.setdefault(len(prompt), []).append(row)
        completions: list[Completion | None] = [None] * len(row_prompts)
        for rows in by_length.values():
            outputs = self._generate_batch([row_prompts[r] for r in rows], params, [seeds[r] for r in rows])
            for row, out in zip(rows, outputs):
                out.prompt_index = row
                completions[row] = out
        return completions  # type: ignore[return-value]  (every row was filled)

    @torch.no_grad()
    def _generate_batch(self, row_prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> list[Completion]:
        stop_ids = set(params.stop_token_ids) | set(self.eos_token_ids)
        sampler = RowSampler.create(params, seeds)
        input_ids_BS, mask_BS = left_pad(row_prompts, self.model.device)
        max_length = input_ids_BS.shape[1] + params.max_new_tokens
        responses: list[list[int]] = [[] for _ in row_prompts]
        logprobs: list[list[float]] = [[] for _ in row_prompts]
        finish: list[FinishReason | None] = [None] * len(row_prompts)
        active = list(range(len(row_prompts)))  # rows still generating, in cache order; finished rows leave
        try:
            logits_BV = self.model.prefill(input_ids_BS, mask_BS, max_length)
            for step in range(params.max_new_tokens):
                token_ids_B, logp_B = sampler.sample(logits_BV, active)
                still = []
                for b, (r, token, logp) in enumerate(zip(active, token_ids_B.tolist(), logp_B.tolist())):
                    responses[r].append(token)
                    logprobs[r].append(logp)
                    if token in stop_ids:
                        finish[r] = "stop"
                    else:
                        still.append(b)
                if not still or step + 1 == params.max_new_tokens:
                    break
                if len(still) < len(active):
                    keep = torch.tensor(still, dtype=torch.long, device=token_ids_B.device)
                    self.model.keep_rows(keep)
                    token_ids_B = token_ids_B[keep]
                    active = [active[b] for b in still]
                logits_BV = self.model.decode(token_ids_B)
        finally:
            self.model.release()
        return [
            Completion(
                prompt_index=r, sample_index=0, prompt_ids=list(prompt), response_ids=responses[r],
                logprobs=logprobs[r], finish_reason=finish[r] or "length", text=self._decode(responses[r]),
            )
            for r, prompt in enumerate(row_prompts)
        ]

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- weights, health, shutdown --------------------------------------------------------------------------
    def update_weights(self, update: WeightUpdate) -> None:
        """Install ``update`` and verify it.

        Embedded (``tensors`` and ``path`` both None): the engine already reads the trainer's parameters, so only
        the version moves. Tensors/path need an adapter with ``load_named_tensors``/``load_checkpoint`` (HF).

        Raises:
            ValueError: tensors/path given to an adapter that shares the trainer's parameters.
            WeightSyncError: a checksum or the probe does not match.
        """
        if update.tensors is not None or update.path is not None:
            loader = "load_named_tensors" if update.tensors is not None else "load_checkpoint"
            if not hasattr(self.model, loader):
                raise ValueError(
                    f"{type(self.model).__name__} shares the trainer's parameters; pass WeightUpdate(tensors=None, "
                    f"path=None) to an embedded local engine"
                )
            if update.tensors is not None:
                self.model.load_named_tensors(update.tensors)
            else:
                self.model.load_checkpoint(update.path)
        self._verify(update)
        self.weight_version = update.version
        logger.debug("local engine at weight version %d", update.version)

    def _verify(self, update: WeightUpdate) -> None:
        if update.checksums:
            weights = self.model.named_weights() if hasattr(self.model, "named_weights") else {}
            for name, expected in update.checksums.items():
                if name not in weights:
                    raise WeightSyncError(f"checksum for '{name}' but the engine has no such weight")
                actual = checksum(weights[name])
                if not checksum_matches(actual, expected):
                    raise WeightSyncError(f"weight '{name}': engine sum {actual!r} != expected {expected!r}")
        if update.probe is not None:
            verify_probe(self.score, update.probe, engine="local")

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs (temperature 1) of ``token_ids[prompt_len:]`` under the engine's weights."""
        return teacher_forced_logprobs(self.model, token_ids, prompt_len)

    def release_memory(self) -> None:
        """No-op: the local engine holds no device memory of its own (embedded: it reads the trainer's parameters;
        separate: an HF copy in host memory)."""

    def resume_memory(self) -> None:
        """No-op (see :meth:`release_memory`)."""

    def health(self) -> EngineHealth:
        detail = "closed" if self._closed else ""
        return EngineHealth(ok=not self._closed, detail=detail, weight_version=self.weight_version)

    def shutdown(self) -> None:
        self._closed = True


def left_pad(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length, on ``device`` (the model's).

    Returns:
        (input_ids [B, S] int64, attention_mask [B, S] bool with True on real tokens).
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device="cpu")
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device="cpu")
        mask[row, width - len(prompt) :] = True
    return input_ids.to(device), mask.to(device)  # one copy each, not one per row
