"""From scored completions to padded training tensors and micro-batches.

Legend: N sequences on this rank, L padded length (prompt + response). Position t of every [N, L] tensor refers to
the prediction of token t+1 from the logits at t ("targets" are tokens shifted left), so a response token's
log-prob lives at the position just before it. Sequences are right-padded: with causal attention, padding after
a sequence never changes its earlier positions, so no attention mask is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
import torch


@dataclass(kw_only=True)
class TrainBatch:
    """One rank's share of a rollout batch, ready for the forward pass."""

    tokens: torch.Tensor
    """[N, L] int64 input ids (prompt + response, right-padded with pad_id)."""
    targets: torch.Tensor
    """[N, L] int64 next tokens (tokens shifted left; pad at the end)."""
    loss_mask: torch.Tensor
    """[N, L] float32, 1 where targets[t] is a response token."""
    advantages: torch.Tensor
    """[N, L] float32, the sequence advantage broadcast to response positions (0 elsewhere)."""
    engine_logprobs: torch.Tensor
    """[N, L] float32 sampling log-probs reported by the rollout engine (0 off the mask)."""
    old_logprobs: torch.Tensor | None = None
    """[N, L] log pi_old from a no-grad pass (off-policy); None = take them detached from the loss forward."""
    proxy_logprobs: torch.Tensor | None = None
    """[N, L] min-p proxy log-probs of pi_old (off-policy); None = from the loss forward."""
    rewards: torch.Tensor | None = None
    """[N] float32 scalar rewards (metrics only)."""

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        """Rows ``index`` of every tensor field."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value[index]
        return replace(self, **changes)


def build_train_batch(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    engine_logprobs: list[list[float]],
    advantages: list[float],
    rewards: list[float],
    *,
    pad_id: int,
    pad_to_multiple: int = 1,
) -> TrainBatch:
    """Pack N (prompt, response) pairs into right-padded [N, L] tensors.

    Args:
        prompt_ids, response_ids, engine_logprobs: per sequence; engine_logprobs aligned with response_ids.
        advantages, rewards: one scalar per sequence.
        pad_id: token id used for padding (its positions are masked out).
        pad_to_multiple: round L up to a multiple of this (keeps pipeline tensor shapes stable).

    Raises:
        ValueError: on mismatched lengths or an empty response list.
    """
    n = len(prompt_ids)
    if not (n == len(response_ids) == len(engine_logprobs) == len(advantages) == len(rewards)):
        raise ValueError("build_train_batch: prompt/response/logprob/advantage/reward lists differ in length")
    if n == 0:
        raise ValueError("build_train_batch: no sequences")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    seq_len = max(lengths)
    seq_len = int(math.ceil(seq_len / pad_to_multiple) * pad_to_multiple)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_len)
    adv = torch.zeros(n, seq_len)
    elp = torch.zeros(n, seq_len)
    for i, (prompt, response, lps) in enumerate(zip(prompt_ids, response_ids, engine_logprobs)):
        if len(lps) != len(response):
            raise ValueError(f"sequence {i}: {len(lps)} engine log-probs for {len(response)} response tokens")
        seq = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        tokens[i, : len(seq)] = seq
        targets[i, : len(seq) - 1] = seq[1:]
        start, end = len(prompt) - 1, len(prompt) - 1 + len(response)  # positions predicting the response
        loss_mask[i, start:end] = 1.0
        adv[i, start:end] = float(advantages[i])
        elp[i, start:end] = torch.tensor(lps, dtype=torch.float32)
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, advantages=adv, engine_logprobs=elp,
                      rewards=torch.tensor(rewards, dtype=torch.float32))


def micro_batch_size_for(seq_len: int, token_budget: int) -> int:
    """Sequences per micro-batch so that sequences x padded length stays within ``token_budget`` (at least 1)."""
    return max(1, token_budget // max(1, seq_len))


def split_micro_batches(batch: TrainBatch, micro_batch_size: int) -> list[TrainBatch]:
    """Consecutive chunks of ``micro_batch_size`` sequences (the last may be smaller)."""
    return [batch.select(slice(i, i + micro_batch_size)) for i in range(0, batch.num_sequences, micro_batch_size)]


def split_mini_batches(batch: TrainBatch, num_updates: int) -> list[TrainBatch]:
    """Split a rank's rollout batch into ``num_updates`` mini-batches of whole sequences (off-policy updates)."""
    if num_updates > batch.num_sequences:
        raise ValueError(
            f"trainer.updates_per_step={num_updates} exceeds the {batch.num_sequences} sequences on this rank"
        )
    size = math.ceil(batch.num_sequences / num_updates)
    return [batch.select(slice(i, i + size)) for i in range(0, batch.num_sequences, size)]
