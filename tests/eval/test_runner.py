"""evaluate() on the fixture benchmark files with a lookup-table engine: numbers, params, files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.data import CharTokenizer, build_dataset
from megatron_lpreg.eval import evaluate, parse_benchmarks
from tests.data.byte_tokenizer import byte_tokenizer
from tests.eval.table_engine import TableEngine, table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
LONG = "Falling distance is g t^2 / 2; " + "x" * 80 + " \\boxed{45}"

ANSWERS = {
    # aime24 (sampled, k=4): 2/4, 0/4, 4/4 correct
    "7^{100}": ["\\boxed{1}", "\\boxed{001}", "so \\boxed{2}", "no box"],
    "divisors does $720$": ["\\boxed{31}"],
    "digits sum to $10$": ["\\boxed{129}"],
    # aime25 via the alias file aime_2025.jsonl: 4/4, 0/4
    "2^{10} - 24": ["\\boxed{1000}"],
    "two zeros": ["\\boxed{9}"],
    # math500 (greedy): math-verify equivalences; the last is wrong
    "frac{6}{12}": ["\\boxed{0.5}"],
    "2x + 3 = 11": ["x = \\boxed{4}"],
    "sqrt{50}": ["\\boxed{\\sqrt{50}}"],
    "x^2 = 9": ["\\boxed{3}"],
    # minerva: the first is truncated by max_new_tokens before its box
    "how far": [LONG],
    "$0.25$": ["\\boxed{1/4}"],
    # olympiadbench (parquet, final_answer lists)
    "a^2+b^2": ["\\boxed{13}"],
    "prime greater": ["\\boxed{103}"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    tok = byte_tokenizer()
    engine = TableEngine(tok, table(ANSWERS))
    cfg = EvalConfig(data_dir=str(FIXTURES), samples=4, temperature=0.6, max_new_tokens=64, template="qwen_chat",
                     batch_size=2)
    results = evaluate(engine, tok, ["aime24,aime25", "math500", "minerva", "olympiadbench"], cfg, out,
                       reward_cfg=RewardConfig(timeout_s=10.0, num_workers=1), seed=7)
    return results, engine, out


def test_numbers(report):
    results, _, _ = report
    by = {r.name: r for r in results.benchmarks}
    assert [r.name for r in results.benchmarks] == ["aime24", "aime25", "math500", "minerva", "olympiadbench"]
    assert (by["aime24"].k, by["aime24"].avg_at_k, by["aime24"].mode) == (4, 0.5, "sampled")
    assert by["aime24"].pass_at_k == pytest.approx(2 / 3)
    assert (by["aime25"].avg_at_k, by["aime25"].pass_at_k) == (0.5, 0.5)
    assert (by["math500"].k, by["math500"].accuracy, by["math500"].mode) == (1, 0.75, "greedy")
    assert by["math500"].reasons == {"match": 1, "verified": 2, "wrong": 1}
    assert (by["minerva"].accuracy, by["minerva"].truncated_frac) == (0.5, 0.5)
    assert by["olympiadbench"].accuracy == 0.5
    # lengths: bytes of the response + the stop token, or max_new_tokens when truncated
    expected = (len("\\boxed{13}") + 1 + len("\\boxed{103}") + 1) / 2
    assert by["olympiadbench"].mean_response_tokens == expected
    assert by["minerva"].mean_response_tokens == (64 + len("\\boxed{1/4}") + 1) / 2


def test_engine_got_paper_sampling_settings(report):
    _, engine, _ = report
    tok = byte_tokenizer()
    stops = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    sampled = [p for _, p in engine.calls if p.n > 1]
    greedy = [p for _, p in engine.calls if p.n == 1]
    assert all((p.n, p.temperature, p.top_k, p.seed, p.stop_token_ids) == (4, 0.6, -1, 7, stops) for p in sampled)
    assert all((p.top_k, p.max_new_tokens) == (1, 64) for p in greedy)
    assert [n for n, _ in engine.calls] == [2, 1, 2, 2, 2, 2, 2]  # batch_size=2 prompts per call


def test_files(report):
    results, _, out = report
    data = json.loads((out / "results.json").read_text())
    assert data["benchmarks"]["aime24"]["pass_at_k"] == pytest.approx(2 / 3)
    assert data["settings"]["template"] == "qwen_chat"
    assert "| math500 | greedy | 4 | 1 | 75.0 | 75.0 | 75.0 |" in (out / "results.md").read_text()
    rows = [json.loads(line) for line in (out / "generations" / "aime24.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    first = rows[0]
    assert (first["id"], first["sample"], first["score"], first["reason"]) == ("60", 0, 1.0, "match")
    assert first["prompt"].startswith("<|im_start|>user\nFind the remainder") and first["prompt"].endswith(
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert results.metrics()["eval/math500/accuracy"] == 0.75


def test_synthetic_heldout_with_char_tokenizer(tmp_path):
    tok = CharTokenizer()

    def respond(prompt: str, sample: int) -> str:
        a, b = prompt.rstrip("=").split("+")
        return f"\\boxed{{{int(a) + int(b) + (1 if a == b else 0)}}}"

    data_cfg = DataConfig(heldout_size=6, dev_size=0)
    res = evaluate(TableEngine(tok, respond), tok, ["synthetic"], EvalConfig(max_new_tokens=14), tmp_path,
                   data_cfg=data_cfg)
    (bench,) = res.benchmarks
    heldout = [p.problem for p in build_dataset(data_cfg, tok, seed=0).heldout()]
    wrong = sum(1 for p in heldout if p[:2] == p[3:5])  # respond() is off by one when both operands are equal
    assert bench.num_problems == 6 and bench.accuracy == pytest.approx((6 - wrong) / 6)


def test_bad_benchmarks(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'aime23'"):
        parse_benchmarks(["aime24,aime23"])
    with pytest.raises(ValueError, match="no benchmark"):
        parse_benchmarks([" , "])
    tok = byte_tokenizer()
    engine = TableEngine(tok, table(ANSWERS))
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        evaluate(engine, tok, ["aime24"], EvalConfig(data_dir=str(tmp_path)), tmp_path)
    assert engine.calls == []  # nothing generated before the failure
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"problem": "Simplify $\\frac{6}{12}$.", "answer": "1/2"}) + "\n")
    res = evaluate(engine, tok, [f"mine={custom}"], EvalConfig(template="plain"), tmp_path / "o")
    assert res.benchmarks[0].accuracy == 1.0
