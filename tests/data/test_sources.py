"""Reading verl-layout and plain problem files, with clear errors for missing files and columns."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_lpreg.data.sources import load_records

VERL_ROWS = [
    {
        "data_source": "dapo_math",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"index": 17, "split": "train"},
    },
    {
        "data_source": "dapo_math",
        "prompt": [{"role": "user", "content": "Half of 1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"index": 18, "split": "train"},
    },
]


def test_verl_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    first, second = load_records(path)
    assert (first.id, first.problem, first.ground_truth, first.data_source) == ("17", "What is 1+1?", "2", "dapo_math")
    assert first.messages == (("system", "Be brief."), ("user", "What is 1+1?"))
    assert second.ground_truth == "\\frac{1}{2}"


def test_plain_jsonl_with_aliases_and_list_answers(tmp_path):
    path = tmp_path / "olympiad.jsonl"
    rows = [{"question": "Find x.", "final_answer": ["$3$"], "id": 5}, {"question": "Pair?", "final_answer": [1, 2]},
            {"question": "Int?", "final_answer": 4.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(path)
    assert [(r.id, r.problem, r.ground_truth, r.data_source) for r in recs] == [
        ("5", "Find x.", "$3$", "olympiad"), ("olympiad:1", "Pair?", "1, 2", "olympiad"),
        ("olympiad:2", "Int?", "4", "olympiad"),
    ]
    assert recs[0].messages == ()


def test_explicit_keys(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"q": "2+2?", "sol": "4"}]}))
    (rec,) = load_records(path, problem_key="q", answer_key="sol")
    assert (rec.problem, rec.ground_truth) == ("2+2?", "4")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"problem": "p"}], "no answer column"),
        ([{"text": "p", "answer": "1"}], r"no problem column .*found columns \['answer', 'text'\]"),
        ([{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}], "'role' and 'content'"),
        ([{"prompt": [{"role": "user", "content": "c"}], "reward_model": {"style": "rule"}}],
         "reward_model.ground_truth"),
        ([], "no rows"),
    ],
)
def test_missing_columns_fail_clearly(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        load_records(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "broken.jsonl").write_text('{"problem": "x", "answer": 1}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_records(tmp_path / "broken.jsonl")
