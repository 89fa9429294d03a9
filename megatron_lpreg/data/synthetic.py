"""The built-in verifiable task ``synthetic:addition``: two-digit addition with a boxed answer.

Prompt ``"37+48="`` (both operands zero-padded to two digits, so every prompt has the same length), reference
response ``"\\boxed{85}"``, ground truth ``"85"``. All 10,000 problems are enumerated; a fixed data seed splits off
a held-out set and a dev set that never appear in training (docs/eval.md, ``synthetic``).
"""
from __future__ import annotations

import random

from megatron_lpreg.data.records import SourceRecord

SYNTHETIC_TASKS = ("synthetic:addition",)


def addition_problems() -> list[SourceRecord]:
    """All 100 x 100 problems in (a, b) order."""
    return [
        SourceRecord(id=f"add:{a:02d}+{b:02d}", problem=f"{a:02d}+{b:02d}=", ground_truth=str(a + b),
                     data_source="synthetic:addition")
        for a in range(100) for b in range(100)
    ]


def reference_response(record: SourceRecord) -> str:
    """The target response for supervised warm start (``\\boxed{<sum>}``)."""
    return f"\\boxed{{{record.ground_truth}}}"


def split_synthetic(name: str, *, heldout_size: int, dev_size: int, data_seed: int
                    ) -> tuple[list[SourceRecord], list[SourceRecord], list[SourceRecord]]:
    """(train, heldout, dev) for synthetic task ``name``; the split depends only on ``data_seed`` and the sizes.

    Raises:
        ValueError: unknown task, or held-out + dev leave no training problems.
    """
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"data.source={name!r} is not a built-in task; choose one of {list(SYNTHETIC_TASKS)} "
                         "or give a .parquet/.jsonl path")
    problems = addition_problems()
    if heldout_size < 0 or dev_size < 0 or heldout_size + dev_size >= len(problems):
        raise ValueError(f"data.heldout_size={heldout_size} + data.dev_size={dev_size} must be >= 0 and leave "
                         f"training problems (there are {len(problems)})")
    order = list(range(len(problems)))
    random.Random(f"synthetic-split:{data_seed}").shuffle(order)
    heldout = [problems[i] for i in order[:heldout_size]]
    dev = [problems[i] for i in order[heldout_size:heldout_size + dev_size]]
    train = [problems[i] for i in sorted(order[heldout_size + dev_size:])]
    return train, heldout, dev
