"""tools/prepare_data.py on small fixtures shaped like the public files: counts, deduplication, normalised
answers, and outputs that the training loader and the benchmark loader read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.config.data import DataConfig
from megatron_lpreg.data.prepare import convert_benchmark, normalize_answer, prepare_dapo, strip_dapo_instruction
from megatron_lpreg.data.sources import load_records, read_rows
from megatron_lpreg.eval.benchmarks import BENCHMARKS, find_benchmark_file

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "prepare"
ROOT = Path(__file__).resolve().parents[2]


def test_normalize_answer():
    assert normalize_answer(" $\\frac{1}{2}$ ") == "\\frac{1}{2}"
    assert normalize_answer("\\boxed{ 12 }") == "12" and normalize_answer("12.0") == "12"
    assert normalize_answer(7.0) == "7"
    assert normalize_answer(["$1$", "$2$"]) == "1, 2" and normalize_answer(["$3$"]) == "3"
    assert normalize_answer("\\boxed{1} or \\boxed{2}") == "\\boxed{1} or \\boxed{2}"
    assert normalize_answer("") is None and normalize_answer(None) is None and normalize_answer(float("nan")) is None
    wrapped = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 2+2?\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")
    assert strip_dapo_instruction(wrapped) == "What is 2+2?" and strip_dapo_instruction("x") == "x"


def test_dapo_is_deduplicated_and_loads_as_training_data(tmp_path):
    out = tmp_path / "dapo.parquet"
    counts = prepare_dapo(FIX / "dapo_math_17k.parquet", out)
    assert (counts.read, counts.kept, counts.duplicates, counts.filtered) == (6, 3, 2, 1)
    records = load_records(out)
    assert [(r.problem, r.ground_truth) for r in records] == [
        ("What is $17 \\cdot 2$?", "34"), ("Compute $\\frac{2}{4}$ in lowest terms.", "\\frac{1}{2}"),
        ("How many  edges does a cube have?", "12")]
    assert records[0].data_source == "math_dapo" and read_rows(out)[0]["extra_info"] == {"index": "a1"}
    from megatron_lpreg.data.dataset import build_dataset
    from megatron_lpreg.data.templates import LPREG_ZERO_TEMPLATE
    from tests.data.byte_tokenizer import byte_tokenizer

    data = build_dataset(DataConfig(source=str(out), template="lpreg_zero", shuffle=False), byte_tokenizer(), seed=0)
    assert data.next_batch(1)[0].text == LPREG_ZERO_TEMPLATE.format(prompt="What is $17 \\cdot 2$?")
    kept = prepare_dapo(FIX / "dapo_math_17k.parquet", tmp_path / "keep.jsonl", keep_instruction=True)
    assert kept.kept == 3 and load_records(tmp_path / "keep.jsonl")[0].problem.startswith("Solve the following")


def test_conflicting_duplicate_answers_are_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(FIX / "dapo_math_17k.parquet")[:2]
    rows[1]["reward_model"] = {"ground_truth": "35", "style": "x"}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="repeated with ground truth '35' but '34'"):
        prepare_dapo(tmp_path / "bad.parquet", tmp_path / "out.parquet")


def test_benchmarks_convert_into_the_eval_layout(tmp_path):
    sources = {"aime24": ["aime_2024.jsonl"], "aime25": ["aime2025-I.jsonl", "aime2025-II.jsonl"],
               "math500": ["math500_test.jsonl"], "minerva": ["minerva_qwen.jsonl"],
               "olympiadbench": ["olympiadbench.jsonl"]}
    counts = {n: convert_benchmark(n, [FIX / f for f in files], tmp_path) for n, files in sources.items()}
    assert {n: (c.read, c.kept, c.filtered) for n, c in counts.items()} == {
        "aime24": (2, 2, 0), "aime25": (2, 2, 0), "math500": (2, 2, 0), "minerva": (2, 2, 0),
        "olympiadbench": (5, 2, 3)}  # physics, Chinese and image rows left out
    loaded = {n: load_records(find_benchmark_file(BENCHMARKS[n], tmp_path)) for n in sources}
    assert [r.ground_truth for r in loaded["minerva"]] == ["0.49", "1e4"]  # from solution's last \boxed{}
    assert [r.ground_truth for r in loaded["olympiadbench"]] == ["3", "1, 2"]
    assert [r.id for r in loaded["aime24"]] == ["60", "61"] and loaded["aime25"][1].ground_truth == "468"
    assert loaded["math500"][0].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    with pytest.raises(ValueError, match="unknown benchmark"):
        convert_benchmark("gsm8k", [], tmp_path)


def test_tool_prints_counts(tmp_path):
    proc = subprocess.run([sys.executable, "tools/prepare_data.py", "eval", "--out", str(tmp_path),
                           "--olympiadbench", str(FIX / "olympiadbench.jsonl"), "--math500",
                           str(FIX / "math500_test.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["math500: read 2, kept 2, duplicates 0, filtered 0",
                                        "olympiadbench: read 5, kept 2, duplicates 0, filtered 3"]
    bad = subprocess.run([sys.executable, "tools/prepare_data.py", "dapo", str(tmp_path / "missing.parquet"),
                          "--out", str(tmp_path / "x.parquet")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.parquet" in bad.stderr
