"""Records of the data side: a source row before templating, and the tokenized :class:`Prompt` the loop uses."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """One problem as read from a file (or generated), before a chat template is applied."""

    id: str
    problem: str
    """The problem text (the last user message for verl-layout rows)."""
    ground_truth: str
    data_source: str
    messages: tuple[tuple[str, str], ...] = ()
    """verl layout: the full chat as (role, content) pairs; empty for plain {problem, answer} rows."""


@dataclass(kw_only=True)
class Prompt:
    """A tokenized prompt ready for the rollout engine."""

    id: str
    """Stable identifier (file stem and row, ``extra_info.index``, or the synthetic problem)."""
    token_ids: list[int]
    """Prompt token ids after the chat template (what the engine receives)."""
    text: str
    """The rendered prompt text (template applied)."""
    ground_truth: str
    """Reference answer for the reward."""
    data_source: str
    """Dataset name (verl ``data_source``; benchmark name; ``synthetic:addition``)."""
    problem: str = ""
    """The raw problem before templating."""


@dataclass(kw_only=True)
class DatasetStats:
    """Counts reported when a dataset is built."""

    source: str
    loaded: int = 0
    """Rows read (synthetic: problems in the training pool)."""
    kept: int = 0
    """Training prompts after length filtering."""
    too_long: int = 0
    """Dropped: longer than ``data.max_prompt_tokens``."""
    heldout: int = 0
    dev: int = 0
    max_prompt_tokens_seen: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"data {self.source}: loaded {self.loaded}, kept {self.kept}, dropped {self.too_long} longer than "
                f"the prompt limit, held out {self.heldout}, dev {self.dev}; longest kept prompt "
                f"{self.max_prompt_tokens_seen} tokens")
