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

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def select(self, index: torch.Tensor | slice) -> TrainBatch:
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
    *,
    pad_id: int,
    pad_to_multiple: int = 1,
) -> TrainBatch:
    """Pack N (prompt, response) pairs into right-padded [N, L] tensors.

    Args:
        prompt_ids, response_ids, engine_logprobs: per sequence; engine_logprobs aligned with response_ids.
        advantages: one scalar per sequence.
        pad_id: token id used for padding (its positions are masked out).
        pad_to_multiple: round L up to a multiple of this (keeps pipeline tensor shapes stable).

    Raises:
        ValueError: on mismatched lengths or an empty response list.
    """
    n = len(prompt_ids)
    if not (n == len(response_ids) == len(engine_logprobs) == len(advantages)):
        raise ValueError("build_train_batch: prompt/response/logprob/advantage lists differ in length")
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
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask, advantages=adv, engine_logprobs=elp)


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


# ---- packed, token-balanced micro-batches (trainer.packing) -------------------------------------------------------

@dataclass(kw_only=True)
class PackedMicroBatch:
    """Several sequences concatenated without padding into one row of at most ``micro_batch_tokens`` tokens.

    The model runs on the packed row, sequences kept apart either by a block-diagonal causal mask (local layer
    spec, :meth:`attention_mask`) or by THD ``cu_seqlens`` built from :attr:`segment_lengths` (Transformer Engine,
    ``megatron_lpreg.models.packed``); each sequence's positions restart at 0. The per-token results are then
    gathered back into ``batch``'s per-sequence layout, so every loss sees the same ``[n, L]`` rows as on the
    padded path (``L`` = this micro-batch's longest sequence).
    """

    batch: TrainBatch
    """The micro-batch's sequences as rows ``[n, L]`` (trimmed to their own longest length)."""
    indices: list[int]
    """Rows of the rank's batch these sequences came from (in ``batch`` order)."""
    tokens: torch.Tensor
    """[1, T] packed input ids (tail padding after the last sequence)."""
    targets: torch.Tensor
    """[1, T] packed next tokens (each sequence's own; pad at each sequence's last position)."""
    position_ids: torch.Tensor
    """[1, T] position of each token inside its own sequence."""
    segments: torch.Tensor
    """[1, T] int64 sequence number of each token (tail padding: a segment of its own)."""
    gather_index: torch.Tensor
    """[n, L] int64 packed column of row i, position t (0 where ``batch.tokens`` is padding)."""
    valid: torch.Tensor
    """[n, L] bool, True on the rows' real tokens."""
    segment_lengths: list[int]
    """Lengths of the row's consecutive segments: each sequence in ``batch`` order, then the tail padding when
    there is any (its own segment, as in ``segments``). They sum to ``T``; THD ``cu_seqlens`` are their prefix sums."""

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def attention_mask(self) -> torch.Tensor:
        """[1, 1, T, T] bool, True = masked (another sequence, or the future): megatron's local-spec convention."""
        same = self.segments[:, :, None] == self.segments[:, None, :]
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=self.tokens.device).tril()
        return ~(same & causal).unsqueeze(1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T]`` per-token values -> ``[n, L]`` rows (0 on padding); differentiable."""
        rows = packed.reshape(-1)[self.gather_index.reshape(-1)].reshape(self.gather_index.shape)
        return torch.where(self.valid, rows, torch.zeros_like(rows))


def sequence_lengths(batch: TrainBatch) -> list[int]:
    """Real length (prompt + response) of every row: up to the last response position + 1 (the final token)."""
    mask = batch.loss_mask > 0
    last = torch.where(mask, torch.arange(batch.seq_len).expand_as(mask), torch.full_like(mask, -1, dtype=torch.long))
    ends = last.max(dim=1).values + 2  # loss position t predicts token t+1
    return [int(e) if e > 1 else 1 for e in ends]


def balanced_partitions(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``budget`` tokens, balanced like verl's dynamic batch
    size: the fewest bins the budget allows (``ceil(sum / budget)``, more when needed), filled longest first into
    the currently lightest bin. A sequence longer than the budget gets a bin of its own. Bins keep index order.

    Raises:
        ValueError: budget < 1.
    """
    if budget < 1:
        raise ValueError(f"micro-batch token budget {budget} must be >= 1")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = max(1, math.ceil(sum(lengths) / budget))
    while True:
        loads, bins = [0] * k, [[] for _ in range(k)]
        fits = True
        for i in order:
            j = min(range(k), key=lambda b: (loads[b], b))
            if loads[j] and loads[j] + lengths[i] > budget:
                fits = False
                break
            loads[j] += lengths[i]
            bins[j].append(i)
        if fits:
            return [sorted(b) for b in bins if b]
        k += 1


def pack_micro_batches(batch: TrainBatch, budget: int, *, pad_id: int = 0, uniform: bool = False,
                       multiple: int = 1) -> list[PackedMicroBatch]:
    """Token-balanced packed micro-batches of ``batch`` (see :func:`balanced_partitions`).

    Args:
        budget: tokens per micro-batch (``trainer.micro_batch_tokens``, prompt + response).
        pad_id: id for the tail padding.
        uniform: pad every packed row to the longest one (pipeline stages send one shape); else each row is
            exactly as long as its sequences.
        multiple: round every row's width up to a multiple of this (sequence parallelism splits the packed
            row over the TP ranks, so its length must divide by ``tp``).
    """
    lengths = sequence_lengths(batch)
    groups = balanced_partitions(lengths, budget)
    longest_pack = max(sum(lengths[i] for i in g) for g in groups)
    out = []
    for group in groups:
        width = longest_pack if uniform else sum(lengths[i] for i in group)
        width = math.ceil(width / multiple) * multiple
        longest = max(lengths[i] for i in group)
        sub = _trim(batch.select(torch.tensor(group)), longest)
        tokens = torch.full((1, width), pad_id, dtype=torch.long)
        targets = torch.full((1, width), pad_id, dtype=torch.long)
        positions = torch.zeros(1, width, dtype=torch.long)
        segments = torch.full((1, width), len(group), dtype=torch.long)
        index = torch.zeros(len(group), longest, dtype=torch.long)
        start = 0
        for row, i in enumerate(group):
            n = lengths[i]
            tokens[0, start:start + n] = sub.tokens[row, :n]
            targets[0, start:start + n] = sub.targets[row, :n]
            positions[0, start:start + n] = torch.arange(n)
            segments[0, start:start + n] = row
            index[row, :n] = torch.arange(start, start + n)
            start += n
        valid = torch.arange(longest).expand(len(group), longest) < torch.tensor([lengths[i] for i in group])[:, None]
        segment_lengths = [lengths[i] for i in group] + ([width - start] if width > start else [])
        out.append(PackedMicroBatch(batch=sub, indices=group, tokens=tokens, targets=targets, position_ids=positions,
                                    segments=segments, gather_index=index, valid=valid,
                                    segment_lengths=segment_lengths))
    return out


def _trim(batch: TrainBatch, length: int) -> TrainBatch:
    """Every ``[N, L]`` field cut to its first ``length`` columns."""
    changes = {f.name: getattr(batch, f.name)[:, :length] for f in fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).dim() == 2}
    return replace(batch, **changes)
