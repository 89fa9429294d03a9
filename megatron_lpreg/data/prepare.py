"""Prepare the paper's data from the public files: DAPO-Math-17k for training, five benchmarks for evaluation.

``prepare_dapo``: DAPO-Math-17k in verl parquet layout (``prompt`` = one user message that wraps the problem in
DAPO's "Solve the following math problem ... Answer: $Answer ..." instruction, ``reward_model.ground_truth``; the
public file repeats each of its ~17.9k problems about 100 times) -> one verl row per distinct problem, ground truth
normalised, DAPO's instruction wrapper removed unless ``keep_instruction`` (the Lp-Reg prompt asks for its own
format; the graders read the last ``\\boxed{}``).

``convert_benchmark``: AIME24 (HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024), AIME25 (opencompass/AIME2025
``aime2025-I/II.jsonl``, math-ai/aime25), MATH-500 (HuggingFaceH4/MATH-500), Minerva (math-ai/minervamath, or the
Qwen2.5-Math eval copy with the answer only in ``solution``'s last ``\\boxed{}``) and OlympiadBench (Hothan/
OlympiadBench; kept: English, maths, text-only, open-ended = the 675-problem ``OE_TO_maths_en_COMP`` subset) ->
the plain layout docs/eval.md lists (``id``, ``problem``, ``answer``), one ``<name>.jsonl`` per benchmark.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lpreg.data.sources import read_rows
from megatron_lpreg.reward.boxed import last_boxed

logger = logging.getLogger(__name__)

DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")
BENCHMARK_NAMES = ("aime24", "aime25", "math500", "minerva", "olympiadbench")
OLYMPIAD_SUBSET = 675
"""Problems in OlympiadBench's English text-only open-ended maths subset (OE_TO_maths_en_COMP)."""


@dataclass
class PrepareCounts:
    """What a conversion read, kept and dropped."""

    name: str
    read: int = 0
    kept: int = 0
    duplicates: int = 0
    filtered: int = 0
    """Rows outside the wanted subset (OlympiadBench) or without a usable answer."""

    def line(self) -> str:
        return (f"{self.name}: read {self.read}, kept {self.kept}, duplicates {self.duplicates}, "
                f"filtered {self.filtered}")


def normalize_answer(value: Any) -> str | None:
    """A ground truth as a clean string: lists joined with ", " (one element unwrapped), surrounding ``$``
    and a whole-answer ``\\boxed{}`` removed, whitespace collapsed, ``12.0`` -> ``12``; None when empty/null."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        parts = [p for p in (normalize_answer(v) for v in value) if p]
        return ", ".join(parts) if parts else None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        value = int(value) if value.is_integer() else value
    text = " ".join(str(value).split())
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    boxed = last_boxed(text)
    if boxed is not None and text == "\\boxed{" + boxed + "}":
        text = boxed.strip()
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text or None


def strip_dapo_instruction(content: str) -> str:
    """The bare problem of a DAPO-Math-17k user message (unchanged when it has no DAPO wrapper)."""
    return DAPO_SUFFIX.sub("", DAPO_PREFIX.sub("", content, count=1)).strip()


def prepare_dapo(src: str | Path, out: str | Path, *, keep_instruction: bool = False) -> PrepareCounts:
    """DAPO-Math-17k (verl parquet/jsonl) -> deduplicated verl rows in ``out`` (.parquet or .jsonl).

    Two rows are duplicates when their (stripped) problem text is equal; the first is kept. Rows whose ground
    truth is empty are dropped (counted as filtered); two copies of a problem with different answers are an error.

    Raises:
        ValueError: a row without ``prompt`` messages or ``reward_model``, conflicting answers for one problem, or an
            unsupported output suffix.
    """
    counts = PrepareCounts("dapo-math-17k")
    kept: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(read_rows(src)):
        counts.read += 1
        messages, reward_model = row.get("prompt"), row.get("reward_model")
        if not isinstance(messages, (list, tuple)) or not messages or not isinstance(reward_model, dict):
            raise ValueError(f"{src} row {i}: not verl layout (prompt = list of messages, reward_model)")
        content = str(messages[-1]["content"])
        problem = " ".join(strip_dapo_instruction(content).split())
        answer = normalize_answer(reward_model.get("ground_truth"))
        if answer is None or not problem:
            counts.filtered += 1
            continue
        if problem in kept:
            counts.duplicates += 1
            if kept[problem]["reward_model"]["ground_truth"] != answer:
                raise ValueError(f"{src} row {i}: problem repeated with ground truth {answer!r} but "
                                 f"{kept[problem]['reward_model']['ground_truth']!r} before: {problem[:80]!r}")
            continue
        text = content.strip() if keep_instruction else strip_dapo_instruction(content)
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        kept[problem] = {"data_source": str(row.get("data_source") or "math_dapo"),
                         "prompt": [{"role": "user", "content": text}], "ability": str(row.get("ability") or "MATH"),
                         "reward_model": {"ground_truth": answer, "style": "rule"},
                         "extra_info": {"index": str(extra.get("index", len(kept)))}}
    counts.kept = len(kept)
    _write(out, list(kept.values()))
    return counts


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def _is_olympiad_subset(row: dict[str, Any]) -> bool:
    """English, maths, text-only, open-ended; a field the file lacks does not exclude the row."""
    checks = {"language": "english", "subject": "math", "modality": "text-only", "question_type": "open-ended"}
    for key, wanted in checks.items():
        value = row.get(key)
        if value is not None and wanted not in str(value).strip().lower():
            return False
    return not any(row.get(f"image_{i}") for i in range(1, 6))


def convert_benchmark(name: str, sources: Iterable[str | Path], out_dir: str | Path) -> PrepareCounts:
    """Convert one benchmark's public file(s) into ``out_dir/<name>.jsonl`` rows ``{id, problem, answer}``.

    Raises:
        ValueError: unknown name, a row without a problem, or no problem left.
    """
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(BENCHMARK_NAMES)}")
    counts = PrepareCounts(name)
    rows_out: list[dict[str, str]] = []
    seen: set[str] = set()
    for src in sources:
        for i, row in enumerate(read_rows(src)):
            counts.read += 1
            if name == "olympiadbench" and not _is_olympiad_subset(row):
                counts.filtered += 1
                continue
            problem = _first(row, ("problem", "question", "Problem", "Question"))
            if problem is None:
                raise ValueError(f"{src} row {i}: no problem/question column (columns: {sorted(row)})")
            answer = normalize_answer(_first(row, ("answer", "final_answer", "Answer", "gt")))
            if answer is None and isinstance(row.get("solution"), str):  # Qwen2.5-Math's Minerva copy
                answer = normalize_answer(last_boxed(row["solution"]))
            if answer is None:
                counts.filtered += 1
                continue
            problem = str(problem).strip()
            if problem in seen:
                counts.duplicates += 1
                continue
            seen.add(problem)
            ident = _first(row, ("id", "ID", "unique_id", "idx"))
            rows_out.append({"id": str(ident) if ident is not None else f"{name}:{len(rows_out)}",
                             "problem": problem, "answer": answer})
    if not rows_out:
        raise ValueError(f"{name}: no problem left from {[str(s) for s in sources]}")
    counts.kept = len(rows_out)
    if name == "olympiadbench" and counts.kept != OLYMPIAD_SUBSET:
        logger.warning("olympiadbench: kept %d problems; the paper's subset has %d", counts.kept, OLYMPIAD_SUBSET)
    _write(Path(out_dir) / f"{name}.jsonl", rows_out)
    return counts


def _write(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        raise ValueError(f"{path}: write .parquet or .jsonl")
    tmp.replace(path)


def run(argv: Sequence[str] | None = None) -> list[PrepareCounts]:
    """Parse ``tools/prepare_data.py`` arguments and convert; the counts are returned for the tool to print.

    Raises:
        FileNotFoundError / ValueError: missing inputs, bad rows (see :func:`prepare_dapo`,
            :func:`convert_benchmark`); SystemExit: bad arguments.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    dapo = sub.add_parser("dapo", help="DAPO-Math-17k verl parquet -> deduplicated training file")
    dapo.add_argument("src")
    dapo.add_argument("--out", required=True, help="output .parquet or .jsonl")
    dapo.add_argument("--keep-instruction", action="store_true", help="keep DAPO's 'Answer:' instruction wrapper")
    bench = sub.add_parser("eval", help="benchmark files -> <out>/<name>.jsonl (docs/eval.md)")
    bench.add_argument("--out", required=True, help="eval.data_dir to write")
    for name in BENCHMARK_NAMES:
        bench.add_argument(f"--{name}", nargs="+", default=[], metavar="FILE", help=f"{name} source file(s)")
    args = parser.parse_args(argv)
    if args.what == "dapo":
        return [prepare_dapo(args.src, args.out, keep_instruction=args.keep_instruction)]
    todo = [(n, getattr(args, n)) for n in BENCHMARK_NAMES if getattr(args, n)]
    if not todo:
        parser.error("give at least one of " + ", ".join(f"--{n}" for n in BENCHMARK_NAMES))
    return [convert_benchmark(n, files, args.out) for n, files in todo]
