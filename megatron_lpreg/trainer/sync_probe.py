"""The trainer's side of the post-sync probe: its own log-probs of a fixed token sequence, scored with the weights
it is about to send, for every engine to match after the sync (``rollout.weight_sync.verify_probe``).

It works for any parallel layout (TP, PP, DP, packing): the sequence goes through the policy's own no-grad
forward (``Policy.compute_old_logprobs``), so every rank must call :func:`trainer_probe` together.
"""
from __future__ import annotations

from typing import Any

from megatron_lpreg.rollout.base import LogprobProbe
from megatron_lpreg.rollout.weight_sync import probe_atol
from megatron_lpreg.trainer.batch import build_train_batch

PROBE_TOKENS = (3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79)
"""The fixed sequence (token ids below 100, valid in any vocabulary the project serves)."""
PROBE_PROMPT_LEN = 4
"""Tokens treated as the prompt; the engine scores the other 12 teacher-forced."""


def trainer_probe(policy: Any, *, params_dtype: str) -> LogprobProbe:
    """A probe of :data:`PROBE_TOKENS` with the policy's current weights, at temperature 1 (collective).

    Args:
        policy: the trainer's ``Policy`` (its ``temperature`` is set to 1 for this pass and restored).
        params_dtype: the trainer's parameter dtype (``model.params_dtype``).

    Returns:
        A ``LogprobProbe`` with tolerance ``probe_atol(params_dtype)``; an engine serving a coarser dtype widens it
        to its own (``SGLangEngine``: ``probe_atol`` of the dtype it serves).
    """
    prompt, continuation = list(PROBE_TOKENS[:PROBE_PROMPT_LEN]), list(PROBE_TOKENS[PROBE_PROMPT_LEN:])
    batch = build_train_batch([prompt], [continuation], [[0.0] * len(continuation)], [0.0], pad_id=0)
    temperature, policy.temperature = policy.temperature, 1.0
    try:
        scored = policy.compute_old_logprobs(batch)
    finally:
        policy.temperature = temperature
    # position t holds the log-prob of token t + 1 (trainer/batch.py)
    expected = scored.old_logprobs[0, PROBE_PROMPT_LEN - 1 : len(PROBE_TOKENS) - 1].double().cpu().tolist()
    return LogprobProbe(token_ids=PROBE_TOKENS, prompt_len=PROBE_PROMPT_LEN, expected_logprobs=tuple(expected),
                        atol=probe_atol(params_dtype))
