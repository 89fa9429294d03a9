"""Read problem files: verl-layout parquet/jsonl and plain {problem, answer} tables.

verl layout (what the Lp-Reg authors' data uses): ``prompt`` = list of chat messages ``{role, content}``,
``data_source``, ``reward_model`` = ``{ground_truth, style}``, optional ``extra_info.index``.
Plain layout: a problem column (``problem`` | ``question``) and an answer column (``answer`` | ``final_answer``
| ``ground_truth``); other names via ``data.problem_key`` / ``data.answer_key``.
"""
from __future__ import annotations

import decimal
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_lpreg.data.records import SourceRecord

logger = logging.getLogger(__name__)

PROBLEM_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer", "final_answer", "ground_truth", "gt")
ID_KEYS = ("id", "unique_id", "idx")
SUFFIXES = (".parquet", ".jsonl", ".json")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .parquet, .jsonl or .json (a list, or ``{"data": [...]}``) file as plain dicts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported suffix, a byte that is not UTF-8 or a malformed line (message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        return rows
    if path.suffix == ".json":
        data = json.loads(_read_utf8(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        return data
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(SUFFIXES)}")


def _read_utf8(path: Path) -> str:
    """The file's text; an undecodable byte is an error naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not valid UTF-8 ({exc.reason}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _answer_text(value: Any, where: str, name: str) -> str:
    """Ground truths come as strings, numbers or lists (OlympiadBench); lists of one are unwrapped.

    Anything else is refused rather than ``str()``-converted: a null would become the answer ``"None"`` (which
    ``\\boxed{None}`` then matches), a NaN ``"nan"``, a bool ``"True"``.

    Raises:
        ValueError: null, empty, non-finite, bool, or another type; the message starts with ``where`` and names
            the field (``name``).
    """
    if value is None:
        raise ValueError(f"{where}: {name} is null; every problem needs a ground-truth answer (drop the row)")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: {name} is an empty list")
        items = [_answer_text(v, where, f"{name}[{i}]") for i, v in enumerate(value)]
        return items[0] if len(items) == 1 else ", ".join(items)
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name} is a bool ({value}), not an answer")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {name}={value} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, decimal.Decimal):  # a parquet decimal column: keep every digit
        if not value.is_finite():
            raise ValueError(f"{where}: {name}={value} is not a finite number")
        return format(value, "f")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, a number or a list of them, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {name} is empty")
    return value.strip()


def _pick(row: dict[str, Any], explicit: str, candidates: Iterable[str]) -> str | None:
    if explicit:
        return explicit if explicit in row else None
    return next((k for k in candidates if k in row), None)


def _messages(value: Any, path: Path, index: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{path} row {index}: 'prompt' must be a non-empty list of {{role, content}} messages")
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{path} row {index}: each prompt message needs 'role' and 'content', got {msg!r}")
        for key in ("role", "content"):  # refused, not str()-converted: 12 or a list of parts is not the text
            if not isinstance(msg[key], str):
                raise ValueError(f"{path} row {index}: prompt[{j}].{key} must be a string, got "
                                 f"{type(msg[key]).__name__} ({msg[key]!r:.60})")
        out.append((msg["role"], msg["content"]))
    return tuple(out)


def records_from_rows(rows: list[dict[str, Any]], path: str | Path, *, problem_key: str = "",
                      answer_key: str = "", data_source: str = "") -> list[SourceRecord]:
    """Turn table rows into :class:`SourceRecord` s, detecting the verl or plain layout from the first row.

    Args:
        rows: dict rows.
        path: the file (names errors and default ids).
        problem_key, answer_key: explicit column names ('' = detect).
        data_source: name to record when rows have no ``data_source`` (default: the file stem).

    Raises:
        ValueError: no rows, a required column is missing (message lists the columns found and the fix), a null,
            empty or non-finite answer, or a prompt/message that is not a string (message names the row).
    """
    path = Path(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = sorted(rows[0])
    verl = not problem_key and isinstance(rows[0].get("prompt"), (list, tuple)) and "reward_model" in rows[0]
    if not verl:
        p_key = _pick(rows[0], problem_key, PROBLEM_KEYS)
        a_key = _pick(rows[0], answer_key, ANSWER_KEYS)
        if p_key is None or a_key is None:
            missing = "problem" if p_key is None else "answer"
            wanted = problem_key or answer_key or " | ".join(PROBLEM_KEYS if p_key is None else ANSWER_KEYS)
            raise ValueError(
                f"{path}: no {missing} column (looked for {wanted}); found columns {columns}. Expected the verl layout "
                "(prompt = list of messages, reward_model.ground_truth, data_source) or a plain table with "
                "problem/answer columns; set data.problem_key / data.answer_key for other names"
            )
    source_default = data_source or path.stem
    out = []
    for i, row in enumerate(rows):
        if verl:
            reward_model = row.get("reward_model")
            if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
                raise ValueError(f"{path} row {i}: verl layout needs reward_model.ground_truth; got {reward_model!r}")
            messages = _messages(row.get("prompt"), path, i)
            users = [content for role, content in messages if role == "user"]
            problem = users[-1] if users else messages[-1][1]
            truth = _answer_text(reward_model["ground_truth"], f"{path} row {i}", "reward_model.ground_truth")
            extra = row.get("extra_info") or {}
            rid = extra.get("index") if isinstance(extra, dict) else None
        else:
            if row.get(p_key) is None or row.get(a_key) is None:
                raise ValueError(f"{path} row {i}: empty '{p_key}' or '{a_key}'")
            if not isinstance(row[p_key], str):
                raise ValueError(f"{path} row {i}: '{p_key}' must be a string, got {type(row[p_key]).__name__} "
                                 f"({row[p_key]!r:.60})")
            messages, problem = (), row[p_key]
            truth = _answer_text(row[a_key], f"{path} row {i}", repr(a_key))
            rid = next((row[k] for k in ID_KEYS if row.get(k) is not None), None)
        out.append(SourceRecord(
            id=str(rid) if rid is not None else f"{path.stem}:{i}",
            problem=problem, ground_truth=truth,
            data_source=str(row.get("data_source") or source_default), messages=messages,
        ))
    return out


def load_records(path: str | Path, *, problem_key: str = "", answer_key: str = "",
                 data_source: str = "") -> list[SourceRecord]:
    """Read ``path`` (see :func:`read_rows`) and convert it (see :func:`records_from_rows`)."""
    records = records_from_rows(read_rows(path), path, problem_key=problem_key, answer_key=answer_key,
                                data_source=data_source)
    logger.info("read %d problems from %s", len(records), path)
    return records
