"""The evaluation benchmarks of the Lp-Reg paper, read from local files, plus the synthetic held-out set.

AIME24/AIME25 are sampled (``eval.temperature``, ``eval.samples`` responses per problem, avg@k); MATH-500, Minerva
and OlympiadBench are greedy (one response). Files live in ``eval.data_dir`` under the names in
:data:`BENCHMARKS` (docs/eval.md lists the columns); ``name=path`` evaluates any problem file greedily.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lpreg.config.data import DataConfig
from megatron_lpreg.data.dataset import to_prompts
from megatron_lpreg.data.records import Prompt
from megatron_lpreg.data.sources import SUFFIXES, load_records
from megatron_lpreg.data.synthetic import split_synthetic


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    file_stems: tuple[str, ...]
    """Accepted file names (without suffix) inside eval.data_dir; also ``<stem>/test.<suffix>``."""
    sampled: bool
    """True: eval.samples responses at eval.temperature (avg@k); False: one greedy response."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24", ("aime24", "aime_2024", "aime2024"), sampled=True),
    "aime25": BenchmarkSpec("aime25", ("aime25", "aime_2025", "aime2025"), sampled=True),
    "math500": BenchmarkSpec("math500", ("math500", "math_500", "MATH-500"), sampled=False),
    "minerva": BenchmarkSpec("minerva", ("minerva", "minerva_math", "minervamath"), sampled=False),
    "olympiadbench": BenchmarkSpec("olympiadbench", ("olympiadbench", "olympiad_bench", "OlympiadBench"),
                                   sampled=False),
    "synthetic": BenchmarkSpec("synthetic", (), sampled=False),
}


@dataclass(frozen=True)
class BenchmarkRequest:
    """One entry of ``--benchmarks``: a known name, or ``name=path`` for a custom file."""

    name: str
    spec: BenchmarkSpec
    path: Path | None = None


def parse_benchmarks(entries: list[str]) -> list[BenchmarkRequest]:
    """Parse ``["aime24", "math500", "mine=/data/x.jsonl"]`` (comma-separated strings are split too).

    A custom file is greedy unless named ``mine@sampled=/data/x.jsonl`` (``eval.samples`` responses at
    ``eval.temperature``: avg@k and pass@k); ``@greedy`` forces one greedy response.

    Raises:
        ValueError: empty list, unknown name or duplicate.
    """
    names = [part.strip() for entry in entries for part in entry.split(",") if part.strip()]
    if not names:
        raise ValueError(f"no benchmark given; choose from {sorted(BENCHMARKS)} or name=path")
    out: list[BenchmarkRequest] = []
    for item in names:
        name, sep, path = item.partition("=")
        if sep:
            name, _, mode = name.partition("@")  # name@sampled=path: avg@k / pass@k at eval.temperature
            if mode not in ("", "sampled", "greedy"):
                raise ValueError(f"benchmark {item!r}: mode {mode!r} unknown; use name@sampled=path or "
                                 "name@greedy=path")
            spec = BENCHMARKS.get(name, BenchmarkSpec(name, (), sampled=False))
            if mode:
                spec = BenchmarkSpec(name, spec.file_stems, sampled=mode == "sampled")
            out.append(BenchmarkRequest(name, spec, Path(path)))
        elif name in BENCHMARKS:
            out.append(BenchmarkRequest(name, BENCHMARKS[name]))
        else:
            raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} or give name=path")
    seen = [r.name for r in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"benchmark listed twice: {seen}")
    return out


def find_benchmark_file(spec: BenchmarkSpec, data_dir: str | Path) -> Path:
    """The file for ``spec`` in ``data_dir``.

    Raises:
        FileNotFoundError: none of the accepted names exists (the message lists what was tried).
    """
    root = Path(data_dir)
    tried = []
    for stem in spec.file_stems:
        for suffix in SUFFIXES:
            for candidate in (root / f"{stem}{suffix}", root / stem / f"test{suffix}"):
                tried.append(candidate.name if candidate.parent == root else f"{stem}/{candidate.name}")
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"benchmark {spec.name!r}: no file in eval.data_dir={str(root)!r}; expected one of {tried[:6]} ... "
        f"(see docs/eval.md), or pass --benchmarks {spec.name}=/path/to/file"
    )


def load_benchmark(request: BenchmarkRequest, tokenizer: Any, *, data_dir: str | Path, template: str,
                   instruction: str, data_cfg: DataConfig) -> list[Prompt]:
    """Tokenized prompts of one benchmark (the synthetic one comes from ``data_cfg``'s held-out split)."""
    if request.name == "synthetic" and request.path is None:
        _, heldout, _ = split_synthetic(data_cfg.source if data_cfg.source.startswith("synthetic:")
                                        else "synthetic:addition", heldout_size=data_cfg.heldout_size,
                                        dev_size=data_cfg.dev_size, data_seed=data_cfg.data_seed)
        records = heldout
    else:
        path = request.path or find_benchmark_file(request.spec, data_dir)
        records = load_records(path, data_source=request.name)
    return to_prompts(records, tokenizer, template=template, instruction=instruction)
