"""Reading verl-layout and plain problem files, with clear errors for missing files and columns."""
from __future__ import annotations

import decimal
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


def _verl_row(truth, content="What is 1+1?", role="user"):
    return {"data_source": "d", "prompt": [{"role": role, "content": content}],
            "reward_model": {"style": "rule", "ground_truth": truth}}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_null_ground_truth_is_refused_naming_the_row(tmp_path, suffix):
    """D11: a null answer must not become the string "None", which ``\\boxed{None}`` would then match."""
    rows = [_verl_row("2"), _verl_row("3"), _verl_row(None)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"train\.\w+ row 2: reward_model\.ground_truth is null"):
        load_records(path)


@pytest.mark.parametrize(
    "truth, message",
    [
        (float("nan"), "not a finite number"),
        (float("inf"), "not a finite number"),
        (True, "bool"),
        (["3", None], r"\[1\] is null"),
        ([], "empty list"),
        ({"value": 3}, "dict"),
        ("  ", "empty"),
    ],
)
def test_unusable_ground_truths_are_refused(tmp_path, truth, message):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"problem": "p0", "answer": "1"}) + "\n"
                    + json.dumps({"problem": "p1", "answer": truth}) + "\n")
    with pytest.raises(ValueError, match=f"plain.jsonl row 1: .*{message}"):
        load_records(path)
    verl = tmp_path / "verl.jsonl"
    verl.write_text(json.dumps(_verl_row("1")) + "\n" + json.dumps(_verl_row(truth)) + "\n")
    with pytest.raises(ValueError, match=f"verl.jsonl row 1: .*{message}"):
        load_records(verl)


def test_numbers_as_ground_truth_keep_every_digit(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"problem": "p", "answer": 9007199254740993}\n{"problem": "q", "answer": 0.1}\n')
    assert [r.ground_truth for r in load_records(path)] == ["9007199254740993", "0.1"]
    exact = tmp_path / "decimal.parquet"
    column = pa.array([decimal.Decimal("123456789012345678.25")], type=pa.decimal128(38, 2))
    pq.write_table(pa.table({"problem": ["p"], "answer": column}), exact)
    assert load_records(exact)[0].ground_truth == "123456789012345678.25"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    """D12: the error names the file and the line of the undecodable byte, not just a byte position."""
    good = json.dumps({"problem": "ok", "answer": "1"}).encode()
    bad = b'{"problem": "caf\xe9", "answer": "2"}'
    body = good + b"\n" + good + b"\n" + bad + b"\n" if suffix == ".jsonl" else b"[\n" + good + b",\n" + bad + b"\n]"
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=rf"latin1{suffix}:3: byte 0xe9 at column 17 is not valid UTF-8"):
        load_records(path)


@pytest.mark.parametrize(
    "row, message",
    [
        (_verl_row("1", content=12), r"row 1: prompt\[0\]\.content must be a string, got int"),
        (_verl_row("1", content=[{"type": "text", "text": "hi"}]), r"row 1: prompt\[0\]\.content must be a string"),
        (_verl_row("1", content=None), r"row 1: prompt\[0\]\.content must be a string, got NoneType"),
        (_verl_row("1", role=1), r"row 1: prompt\[0\]\.role must be a string, got int"),
        ({"problem": 12, "answer": "1"}, r"row 1: 'problem' must be a string, got int"),
        ({"problem": ["a", "b"], "answer": "1"}, r"row 1: 'problem' must be a string, got list"),
    ],
)
def test_non_string_prompts_are_refused_not_converted(tmp_path, row, message):
    """D13: a number or a list where text belongs is refused, never ``str()``-converted into the prompt."""
    first = _verl_row("1") if "prompt" in row else {"problem": "p", "answer": "1"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        load_records(path)
