#!/usr/bin/env python
"""Prepare the paper's data (megatron_lpreg/data/prepare.py); prints one count line per dataset.

    python tools/prepare_data.py dapo dapo-math-17k.parquet --out data/dapo-math-17k.parquet
    python tools/prepare_data.py eval --out data/eval --aime24 aime_2024.parquet \
        --aime25 aime2025-I.jsonl aime2025-II.jsonl --math500 test.jsonl --minerva minerva.jsonl \
        --olympiadbench OE_TO_maths_en_COMP.parquet
"""
from __future__ import annotations

import sys

from megatron_lpreg.data.prepare import run


def main() -> int:
    try:
        results = run(sys.argv[1:])
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare_data: {exc}", file=sys.stderr)
        return 2
    for counts in results:
        print(counts.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
