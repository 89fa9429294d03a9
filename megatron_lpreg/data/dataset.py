"""The prompt dataset the RL loop draws from: templated, tokenized, length-filtered, shuffled per epoch, with a
resumable cursor.

Order: epoch ``e`` visits the training prompts in a permutation seeded by (seed, e) (or file order when
``data.shuffle`` is false); ``next_batch`` continues across epoch boundaries. ``state_dict()`` is the cursor
(epoch, position) plus a fingerprint of the prompt set, so a resumed run draws exactly what an uninterrupted run
would have drawn, and resuming onto different data fails loudly.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from megatron_lpreg.config.data import DataConfig
from megatron_lpreg.data.records import DatasetStats, Prompt, SourceRecord
from megatron_lpreg.data.sources import load_records
from megatron_lpreg.data.synthetic import split_synthetic
from megatron_lpreg.data.templates import encode, render

logger = logging.getLogger(__name__)


def to_prompts(records: Sequence[SourceRecord], tokenizer: Any, *, template: str, instruction: str = ""
               ) -> list[Prompt]:
    """Apply ``template`` and tokenize (see :func:`megatron_lpreg.data.templates.render`)."""
    prompts = []
    for rec in records:
        text = render(template, rec.problem, rec.messages, tokenizer=tokenizer, instruction=instruction)
        prompts.append(Prompt(id=rec.id, token_ids=encode(tokenizer, text), text=text,
                              ground_truth=rec.ground_truth, data_source=rec.data_source, problem=rec.problem))
    return prompts


class PromptDataset:
    """Training prompts with a deterministic, resumable order, plus held-out and dev prompts."""

    def __init__(self, prompts: Sequence[Prompt], *, seed: int, shuffle: bool = True,
                 heldout: Sequence[Prompt] = (), dev: Sequence[Prompt] = (), stats: DatasetStats | None = None
                 ) -> None:
        """
        Raises:
            ValueError: no training prompts.
        """
        if not prompts:
            raise ValueError("the prompt dataset is empty (every prompt was filtered out?); "
                             f"{stats.summary() if stats else ''}")
        self._prompts = list(prompts)
        self._heldout = list(heldout)
        self._dev = list(dev)
        self.seed = seed
        self.shuffle = shuffle
        self.stats = stats or DatasetStats(source="memory", loaded=len(prompts), kept=len(prompts))
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)
        self._fingerprint = hashlib.sha1("\n".join(p.id for p in self._prompts).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._prompts)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._prompts)))
        if self.shuffle:
            random.Random(f"prompt-order:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` training prompts (wrapping into the next epoch, which is reshuffled).

        Raises:
            ValueError: n < 1.
        """
        if n < 1:
            raise ValueError(f"next_batch(n={n}): n must be >= 1")
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(batch), len(self._order) - self.position)
            batch.extend(self._prompts[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def heldout(self) -> list[Prompt]:
        """Evaluation prompts never drawn by :meth:`next_batch` (synthetic task: the fixed held-out split)."""
        return list(self._heldout)

    def dev(self) -> list[Prompt]:
        """A second excluded split (synthetic task), e.g. to stop a supervised warm start."""
        return list(self._dev)

    def state_dict(self) -> dict[str, Any]:
        """The cursor: plain data for a checkpoint."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self._prompts),
                "shuffle": self.shuffle, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor.

        Raises:
            ValueError: the state belongs to a different prompt set, seed or shuffle setting (names the field).
        """
        for key, mine in (("size", len(self._prompts)), ("fingerprint", self._fingerprint), ("seed", self.seed),
                          ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(f"data cursor mismatch: saved {key}={state[key]!r} but this dataset has {mine!r}; "
                                 "resume with the same data.source, template, max_prompt_tokens, shuffle and seed")
        position = int(state["position"])
        if not 0 <= position <= len(self._prompts):
            raise ValueError(f"data cursor position={position} outside [0, {len(self._prompts)}]")
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = self._epoch_order(self.epoch)


def _filter_length(prompts: list[Prompt], limit: int, stats: DatasetStats) -> list[Prompt]:
    kept = [p for p in prompts if len(p.token_ids) <= limit]
    stats.too_long += len(prompts) - len(kept)
    return kept


def build_dataset(cfg: DataConfig, tokenizer: Any, *, seed: int) -> PromptDataset:
    """Build the training dataset ``cfg.source`` names.

    Args:
        cfg: data config (source, template, length limit, shuffle, synthetic split sizes).
        tokenizer: any tokenizer with ``encode`` (HF, or :class:`~megatron_lpreg.data.char_tokenizer.CharTokenizer`).
        seed: the run seed; the epoch order derives from it.

    Returns:
        The dataset; ``dataset.stats`` holds the counts that were also logged.

    Raises:
        ValueError / FileNotFoundError: bad source, missing file or columns, or nothing left after filtering.
    """
    cfg.validate()
    stats = DatasetStats(source=cfg.source)
    heldout_records: list[SourceRecord] = []
    dev_records: list[SourceRecord] = []
    if cfg.source.startswith("synthetic:"):
        records, heldout_records, dev_records = split_synthetic(
            cfg.source, heldout_size=cfg.heldout_size, dev_size=cfg.dev_size, data_seed=cfg.data_seed)
    else:
        records = load_records(cfg.source, problem_key=cfg.problem_key, answer_key=cfg.answer_key)
    stats.loaded = len(records)

    def prompts_of(recs: Sequence[SourceRecord]) -> list[Prompt]:
        return to_prompts(recs, tokenizer, template=cfg.template, instruction=cfg.instruction)

    train = _filter_length(prompts_of(records), cfg.max_prompt_tokens, stats)
    heldout = _filter_length(prompts_of(heldout_records), cfg.max_prompt_tokens, stats)
    dev = _filter_length(prompts_of(dev_records), cfg.max_prompt_tokens, stats)
    stats.kept, stats.heldout, stats.dev = len(train), len(heldout), len(dev)
    stats.max_prompt_tokens_seen = max((len(p.token_ids) for p in train), default=0)
    logger.info("%s", stats.summary())
    return PromptDataset(train, seed=seed, shuffle=cfg.shuffle, heldout=heldout, dev=dev, stats=stats)
